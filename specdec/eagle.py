"""The feature drafter (EAGLE-3; Li et al. 2025): one decoder layer that predicts the target's next
token from the target's own features.

At position p its input is the next token's embedding e(t_p) (the target's embedding table,
frozen) beside a hidden state: the fused target features g_{p-1} = fc([low, mid, high]) of the
position before, or, when drafting further than the target has computed, the drafter's own
output h_{p-1} at that position. Both are RMS-normalised and concatenated, go through one Llama
decoder layer (attention over the drafter's own KV cache, MLP), and a final norm and an LM head
over a reduced draft vocabulary (the target's most frequent output tokens; `d2t` maps them back
to target ids) give q. Outside the draft vocabulary q is zero, which the sampling rules allow.

Training unrolls a few drafting steps ("training-time test"): step j feeds the drafter its own
step-(j-1) outputs, and attends to what inference would hold (`ttt_mask`).

A drafter is a folder: config.json (this module's DrafterConfig, with "specdec_drafter":
"eagle3"), model.safetensors (float16 weights and d2t) and README.md (its card).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specdec import ggml_blocks
from specdec.cpu_kernels import CpuLayer, CpuLinear, FusedLayer, PackedWeight

KIND = "eagle3"
# The head's matrix products when drafting (EagleDrafter.with_matmul_dtype): float16 (the shipped
# weights exactly; a proposal takes a third of the float32 time on a CPU: bench/RESULTS.md,
# "Cheaper proposals"), or the weights rounded into one of GGML's block formats (q8_0, q4_1),
# which the C product reads where it runs (a CPU): fewer bytes a draft step than float16.
# The default, auto: q8_0 where the C product reads blocks, else float16
# (draft_service.feature_drafter.drafting_products).
BLOCK_TYPES = (ggml_blocks.Q8_0, ggml_blocks.Q4_1)
AUTO = "auto"
MATMUL_DTYPES = (AUTO, "float16", "bfloat16", "float32", *BLOCK_TYPES)
DRAFT_MATMUL_DTYPE = AUTO


def matmul_type(name: str) -> torch.dtype | str:
    """A MATMUL_DTYPES name (auto resolved) as CastLinear takes it: a torch dtype, or a block
    format's name."""
    if name == AUTO:
        raise ValueError("matmul dtype auto names no dtype until resolved (feature_drafter.drafting_products)")
    if name not in MATMUL_DTYPES:
        raise ValueError(f"matmul dtype {name!r} is not one of {', '.join(MATMUL_DTYPES)}")
    return name if name in BLOCK_TYPES else getattr(torch, name)


@dataclass
class DrafterConfig:
    target: str  # the target model it was trained for (spec: folder, hub id, .gguf, 'smollm2')
    vocab_fingerprint: str  # the target tokenizer's (specdec.models.vocab_fingerprint)
    feature_layers: list[int]  # target hidden-state indices fused (0 = embeddings, i = layer i's output)
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    target_vocab_size: int
    draft_vocab_size: int
    rope_scaling: dict | None = None
    specdec_drafter: str = KIND
    training: dict = field(default_factory=dict)  # what the card reports (data, steps, device, ...)
    # A sampled request's q is shaped at its temperature times this (and its top-k / top-p). Any q
    # keeps both sampling rules exact. A cooler q keeps more first drafts (`python -m bench.rules
    # --temperature-scales`) but, for the shipped drafter, fewer tokens per step in the default
    # pipeline (bench/RESULTS.md, "q's temperature"); 1.0: the request's own.
    temperature_scale: float = 1.0

    @classmethod
    def for_target(cls, target_config, target: str, fingerprint: str, vocab: int, draft_vocab: int,
                   feature_layers: list[int]) -> "DrafterConfig":
        heads = target_config.num_attention_heads
        return cls(
            target=target, vocab_fingerprint=fingerprint, feature_layers=list(feature_layers),
            hidden_size=target_config.hidden_size, intermediate_size=target_config.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(target_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(target_config, "head_dim", None) or target_config.hidden_size // heads,
            rms_norm_eps=target_config.rms_norm_eps,
            rope_theta=float(getattr(target_config, "rope_theta", None) or
                             (getattr(target_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
            max_position_embeddings=target_config.max_position_embeddings, target_vocab_size=vocab,
            draft_vocab_size=draft_vocab, rope_scaling=getattr(target_config, "rope_scaling", None),
        )

    def save(self, folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "DrafterConfig":
        return cls(**json.loads((Path(folder) / "config.json").read_text()))


def is_drafter_folder(spec: str) -> bool:
    config = Path(spec) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("specdec_drafter") == KIND


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.kernel: CpuLayer | None = None  # drafting on a CPU: the runner's C norm (with_small_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dtype == torch.float32 and x.dim() == 2:
            return self.kernel.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# Rows from which a CastLinear on a CPU computes in its layer's own dtype. torch's float16 product
# there costs each row what reading the weights costs (0.18 ms a row for an 8192 x 576 head), its
# float32 one shares the read among the rows: 1.2 against 1.5 ms at 8 rows, 3.7 against 12.4 at 64,
# and a 1,200-token prompt taken in 2.7x faster (bench/RESULTS.md, "Rounds with less waiting").
WIDE_ROWS = 8
# The same where the C product (specdec.cpu_kernels) computes the narrow calls: it reads float16
# weights once for up to twelve rows and widens them in registers, faster than torch's float32
# product up to about 64 rows on the Intel host (bench/RESULTS.md, "The drafter's products in C").
C_WIDE_ROWS = 64


class CastLinear(nn.Module):
    """A bias-free linear layer computed in another dtype: its weight stored in `dtype`, the
    input cast to it and the product cast back to the layer's own dtype (inference only). On a
    CPU, calls of WIDE_ROWS rows or more (a prompt taken in, many sessions' trees) run in the
    layer's own dtype on a copy of the same weights held in it. Given the C product
    (`products`, where it computes `dtype`: float32, or float16 on CPUs that convert it), calls
    of fewer than C_WIDE_ROWS rows run there on the same weights packed, the input kept in
    float32. `dtype` a block format (BLOCK_TYPES): the weight rounded into it
    (ggml_blocks.quantized), whose numbers every call then computes on, the C product reading
    the blocks."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | str, products: CpuLinear | None = None):
        super().__init__()
        self.out_dtype = linear.weight.dtype
        blocks = ggml_blocks.quantized(linear.weight, dtype) if isinstance(dtype, str) else None
        weight = blocks.dequantized().to(self.out_dtype) if blocks is not None else linear.weight.detach().to(dtype)
        self.register_buffer("weight", weight)
        cpu = self.weight.device.type == "cpu"
        wide = (self.weight if self.weight.dtype == self.out_dtype else self.weight.to(self.out_dtype)) if cpu else None
        self.register_buffer("wide_weight", wide, persistent=False)
        computes = products is not None and cpu and self.out_dtype == torch.float32 and products.computes(dtype)
        self.products = products if computes else None
        packed = PackedWeight.of_blocks(blocks) if blocks is not None else PackedWeight.of(self.weight)
        self.packed = packed if computes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.packed is not None and rows < C_WIDE_ROWS:  # (the path of every draft step: kept lean)
            if x.dim() == 2:
                return self.products(x.float(), self.packed)
            return self.products(x.reshape(rows, x.shape[-1]).float(), self.packed).view(*x.shape[:-1], -1)
        if self.wide_weight is not None and rows >= (WIDE_ROWS if self.packed is None else C_WIDE_ROWS):
            return F.linear(x.to(self.out_dtype), self.wide_weight)
        return F.linear(x.to(self.weight.dtype), self.weight).to(self.out_dtype)


# The drafting head's stacked products (with_matmul_dtype): each the named layers' outputs, in order.
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One bias-free linear layer whose outputs are those of `linears`, in order."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        stacked.weight.copy_(weight)
    return stacked


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class EagleDrafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                             config.num_key_value_heads, config.head_dim)
        self.fc = nn.Linear(len(config.feature_layers) * hidden, hidden, bias=False)
        self.input_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.q_proj = nn.Linear(2 * hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.post_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.gate_proj = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, hidden, bias=False)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.steps: CpuLayer | None = None  # drafting on a CPU: the runner's C rotary (with_small_steps)
        # Drafting only (with_matmul_dtype): q|k|v and gate|up each one product on their weights
        # stacked, whose outputs are the separate products' (each output its own sum), in place of
        # the separate layers; and on a CPU the layer's second half as one C call (with_small_steps).
        self.qkv_proj: CastLinear | None = None
        self.gate_up_proj: CastLinear | None = None
        self.layer_in_c: FusedLayer | None = None
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    # --- pieces -------------------------------------------------------------------------------

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [..., layers * hidden] -> g [..., hidden]."""
        return self.fc(features.to(self.fc.weight.dtype))

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()

    def qkv(self, embeddings: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """Queries, keys and values of inputs [..., n, hidden] at positions [..., n]:
        q [..., heads, n, dim], k and v [..., kv_heads, n, dim]."""
        c = self.config
        x = torch.cat([self.input_norm(embeddings), self.hidden_norm(hidden)], dim=-1)
        shape = x.shape[:-1]
        cos, sin = self.rotary(positions)
        widths = [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2
        if self.steps is not None and x.dim() == 2:  # drafting on a CPU: q and k rotated in place, in C
            qkv = self.qkv_proj(x) if self.qkv_proj is not None else torch.cat(
                [self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
            self.steps.rotate(qkv, c.num_attention_heads + c.num_key_value_heads, c.head_dim, cos, sin)
            q, k, v = qkv.split(widths, dim=-1)
            return (q.view(*shape, c.num_attention_heads, c.head_dim).transpose(-2, -3),
                    k.view(*shape, c.num_key_value_heads, c.head_dim).transpose(-2, -3),
                    v.view(*shape, c.num_key_value_heads, c.head_dim).transpose(-2, -3))
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(widths, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(*shape, c.num_attention_heads, c.head_dim).transpose(-2, -3)
        k = k.reshape(*shape, c.num_key_value_heads, c.head_dim).transpose(-2, -3)
        v = v.reshape(*shape, c.num_key_value_heads, c.head_dim).transpose(-2, -3)
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def finish(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer's output h from its residual input and the attention output [..., heads, n, dim]."""
        attended = attended.transpose(-2, -3).flatten(-2)
        if self.layer_in_c is not None and attended.dim() == 2 and attended.shape[0] < C_WIDE_ROWS:
            return self.layer_in_c.mix(hidden, attended)  # (drafting on a CPU: one C call)
        x = hidden + self.o_proj(attended)
        h = self.post_norm(x)
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(h), self.up_proj(h)
        return x + self.down_proj(F.silu(gate) * up)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., draft_vocab] of outputs h."""
        return self.lm_head(self.norm(h))

    def with_matmul_dtype(self, dtype: torch.dtype | str, products: CpuLinear | None = None) -> "EagleDrafter":
        """For drafting only: every linear layer's product in `dtype` (CastLinear; matmul_type),
        norms, attention and the residual stream left in float32. Drafts only steer, so this
        changes no output; float16 holds the shipped weights exactly and, on a CPU, reads half the
        memory per draft step (bench/RESULTS.md: 3x faster proposals here), a block format (q8_0)
        rounds them and reads about half of that again; calls of many rows use a float32 copy of
        the same weights (CastLinear). Given the C product (specdec.cpu_kernels), the calls of
        few rows run there. q, k and v are then one product, and gate and up another (their
        weights stacked: a block format rounds each output's weights on their own, so the same
        numbers): three calls fewer a draft step. The separate layers go (their weights are the
        stacked ones'): a drafting head is not trained or saved."""
        if dtype != torch.float32 or products is not None:
            for name, parts in STACKED.items():
                setattr(self, name, _stacked(*(getattr(self, part) for part in parts)))
                for part in parts:
                    delattr(self, part)
            for name, child in list(self.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(self, name, CastLinear(child, dtype, products))
        return self

    def with_small_steps(self, steps: CpuLayer | None) -> "EagleDrafter":
        """For drafting only, on a CPU: the norms and the rotary embedding of calls of rows
        ([rows, width]) through the runner's C steps (specdec.cpu_kernels), one call each instead
        of some seven torch operations, whose dispatch cost more than their arithmetic (0.4 ms of a
        7.2 ms proposal for the norms alone). Where the C product computes the layer's products
        (with_matmul_dtype), the layer after its attention (the output projection, the norm, the
        MLP, each added to its input) is one C call too, the runner's (FusedLayer.mix) for calls
        of fewer than C_WIDE_ROWS rows. None: torch's."""
        self.steps = steps
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.kernel = steps
        parts = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
        self.layer_in_c = None
        if steps is not None and all(isinstance(p, CastLinear) and p.packed is not None for p in parts):
            c = self.config
            self.layer_in_c = steps.fused(
                self.o_proj.products, input_norm=self.input_norm.weight.detach(), qkv=self.qkv_proj.packed,
                qkv_bias=None, o=self.o_proj.packed, o_bias=None, post_norm=self.post_norm.weight.detach(),
                gate_up=self.gate_up_proj.packed, gate_up_bias=None, down=self.down_proj.packed, down_bias=None,
                eps=c.rms_norm_eps, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=c.head_dim)
        return self

    # --- training ---------------------------------------------------------------------------

    def unrolled(self, embeddings: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test over whole sequences. embeddings [B, T, H] of tokens t_0..t_{T-1},
        features [B, T, layers*H] of the target at those positions. Step 1 reads the target's
        g_{p-1}; step j > 1 reads the drafter's own step-(j-1) output at p-1 and attends as drafting
        would (ttt_mask). Returns the draft-vocabulary logits of every step, [B, T, Vd] each; row p
        predicts t_{p+1}."""
        batch, length, _ = embeddings.shape
        positions = torch.arange(length, device=embeddings.device).expand(batch, length)
        previous = F.pad(self.fuse(features), (0, 0, 1, 0))[:, :-1]  # g_{p-1}, zeros at p = 0
        keys, values, outputs = [], [], []
        for step in range(1, steps + 1):
            q, k, v = self.qkv(embeddings, previous, positions)
            keys.append(k)
            values.append(v)
            mask = ttt_mask(length, step, embeddings.device)
            attended = F.scaled_dot_product_attention(q, torch.cat(keys, dim=-2), torch.cat(values, dim=-2),
                                                      attn_mask=mask, enable_gqa=True)
            h = self.finish(previous, attended)
            outputs.append(self.logits(h))
            previous = F.pad(h, (0, 0, 1, 0))[:, :-1]  # own output at p-1 feeds step + 1 at p
        return outputs

    # --- files ------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: (t.detach().half() if t.is_floating_point() else t.detach()).contiguous().cpu()
                   for name, t in self.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"))
        self.config.save(folder)

    @classmethod
    def load(cls, folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "EagleDrafter":
        from safetensors.torch import load_file

        model = cls(DrafterConfig.load(folder))
        state = load_file(str(Path(folder) / "model.safetensors"))
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
        return model.to(device).eval()


def ttt_mask(length: int, step: int, device) -> torch.Tensor:
    """Which keys a step-`step` query at position p sees, [T, step * T] (True = attend): the
    step-1 keys (computed from target features) at positions <= p - step + 1, then for each later
    step i the one key at position p - step + i, which is what the drafter's cache holds when it
    drafts position p after starting from position p - step + 1."""
    rows = torch.arange(length, device=device)[:, None]
    cols = torch.arange(length, device=device)[None, :]
    blocks = [cols <= rows - step + 1]
    blocks += [cols == rows - step + i for i in range(2, step + 1)]
    return torch.cat(blocks, dim=1)
