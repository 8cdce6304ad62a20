"""One forward path for every model a service hosts: the target's verify, a model drafter's steps,
over a batch of sessions' caches (specdec.kv_cache.SessionKV).

Supported: decoder-only models with the Llama layout (Llama, Mistral without a sliding window,
Qwen2, Qwen3, SmolLM); their Hugging Face modules give the weights, the norms and the rotary
tables, and this module runs them.

Batch- and chunk-invariant numbers. A position's keys, values and logits are bitwise the same
however it was computed: alone or batched with other sessions, in a prompt's prefill or one
round at a time, after a rollback, or rebuilt on another replica from a snapshot plus a
recomputed tail. Seeded sampling then gives the same tokens after any failover. It holds
because every reduction is done the same way whatever the batch:
  * matrix products on CPU run in C (specdec.cpu_kernels), each output one chain of
    multiply-adds over its inputs in order, the same at any row count. Elsewhere (CUDA, no C
    compiler) they see a row count padded to a multiple of ROWS: the BLAS picks other kernels
    (with other rounding) for some small row counts; and where it also picks other kernels for
    larger counts (MKL on AVX-512 Xeons does from 16 rows), the eager stages run in pieces of
    rows no larger than the span it treats alike, probed at start-up (product_rows; the LM head
    has its own). On CPU without the C kernels the products are oneDNN's (onednn_linear), probed
    the same way;
  * a layer's norms, rotary embedding and activation are row by row: on CPU in C (CSteps, a
    norm's squares summed in fixed lanes; with the C products each layer's halves around its
    attention are one C call each, cpu_kernels.FusedLayer, the same kernels in the same order),
    elsewhere torch's (TorchSteps);
  * attention on CPU runs in C (specdec.cpu_kernels), each query row over its own list of
    key slots in a fixed order, so nothing else in the call changes its numbers; a tree's node
    off its leading chain lists the slots before the tree, then its ancestors' and its own
    (_key_lists): the keys, in order, that a chain of those tokens reads;
  * elsewhere (CUDA, or no C compiler) attention runs per session over fixed blocks of BLOCK key
    positions, aligned to absolute positions, and adds the blocks' contributions in order (a
    running sum); blocks past a query's position contribute exact zeros, so the number of blocks
    (the session's current length) does not change the sums; a tree's node off its leading
    chain attends to a copy of the cache laid out as its ancestors' chain would be (_tree_layout);
  * rotary tables are computed once per position, not per call.
A replica's numbers are its own: replicas that take over each other's sessions run the same
paths (the same torch, CPU kind and attention), as they run the same model.
tests/test_invariance.py checks it on every path; its cost is measured in bench/RESULTS.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from specdec import cpu_kernels
from specdec.kv_cache import BLOCK, FeatureBuffer, KVShape, SessionCache, SessionKV, common_prefix_len
from specdec.sampling import tree_depths

ROWS = 4  # row counts of matrix products are padded to a multiple of this
# On CUDA, passes of up to this many rows (verify and decode batches) replay CUDA graphs; larger
# ones (prefill chunks of many sessions) run the eager stages, where launches cost little.
GRAPH_MAX_ROWS = 512
MAX_CHUNK = 256  # new positions of one session per pass; a longer prefill takes several passes
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModel(ValueError):
    """The model's architecture is not one this runner implements."""


@dataclass
class ForwardJob:
    """One session's part of a pass: logits at input positions first..len(tokens)-1, and, when
    feature_layers is set, the outputs of those layers (features) at positions
    features_from..len(tokens)-1."""

    entry: SessionCache
    tokens: Sequence[int]
    first: int
    feature_layers: tuple[int, ...] = ()  # hidden-state indices: 0 = embeddings, i = layer i's output
    features_from: int = 0
    # A tree of drafts: the last len(tree) tokens are its nodes and tree[i] is node i's parent (an
    # index into the nodes, -1 for the token before them). Each node sits at position (the tree's
    # start - 1 + its depth) and attends to the tokens before the tree and to its ancestors.
    tree: Sequence[int] | None = None

    @property
    def tree_start(self) -> int:
        return len(self.tokens) - len(self.tree) if self.tree else len(self.tokens)

    def tree_positions(self) -> list[int]:
        """Position of each node (slot tree_start + i holds node i)."""
        return [self.tree_start - 1 + depth for depth in tree_depths(self.tree)] if self.tree else []

    def chain_len(self) -> int:
        """How many nodes, from the first, form a chain (node i's parent is node i - 1): their
        cache entries are what a chain of those tokens computes, and stay valid."""
        count = 0
        for i, parent in enumerate(self.tree or ()):
            if parent != i - 1:
                break
            count += 1
        return count


@dataclass
class ForwardResult:
    # float32 [len(tokens) - first, vocab]; row j predicts tokens[first + j + 1] (in a tree: the
    # token after the one at slot first + j, given its ancestors)
    logits: torch.Tensor
    reused: int  # cached positions kept
    features: torch.Tensor | None = None  # float16 [len(tokens) - features_from, layers * hidden]


@dataclass(frozen=True)
class _TreeLayout:
    """Where a pass's off-chain tree nodes attend (ModelRunner._tree_layout): the cache slots each
    reads in the tail blocks (flattened, [nodes * tail blocks * BLOCK]) and the first tail block,
    with the index tensors every layer uses."""

    rows: torch.Tensor  # the nodes' rows in the span
    gather: torch.Tensor
    first_block: int
    positions: torch.Tensor  # each node's position
    query_rows: torch.Tensor  # the nodes' rows among the span's attention rows (head in group, node)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights, as plain tensors (what the dense stages take)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _root_path(parents: Sequence[int], node: int) -> list[int]:
    """A tree node's ancestors, root first, then the node itself."""
    path = [node]
    while parents[path[0]] >= 0:
        path.insert(0, parents[path[0]])
    return path


def _padded_rows(count: int) -> int:
    return max(ROWS, -(-count // ROWS) * ROWS)


def _bucket(count: int) -> int:
    """A compiled pass's row count: the next power of two (at least ROWS), so that a few shapes
    (and CUDA graphs) cover every pass."""
    return max(ROWS, 1 << (count - 1).bit_length())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, computed as Hugging Face computes it (in float32)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class TorchSteps:
    """A layer's steps around its attention, in torch: its products by `product`, which takes the
    weights as they are stored (F.linear, or onednn_linear on reordered weights)."""

    def __init__(self, product=F.linear):
        self.product = product

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def linear(self, x: torch.Tensor, weight, bias: torch.Tensor | None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T (+ bias), added to residual when given."""
        y = self.product(x, weight, bias)
        return y if residual is None else residual + y

    def rotary(self, qkv: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor, heads: int,
               kv_heads: int, head_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys (normed where the layer has q and k norms, then rotated) and values of a
        product's rows qkv [P, (heads + 2 kv_heads) * head_dim]."""
        q, k, v = _heads_of(qkv, heads, kv_heads, head_dim)
        if layer.q_norm is not None:
            q, k = rms_norm(q, layer.q_norm, eps), rms_norm(k, layer.k_norm, eps)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        return q, k, v

    def gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of rows (gate, up)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class CSteps(TorchSteps):
    """The same steps through the C kernels (specdec.cpu_kernels): the products on packed weights,
    a norm, a rotation and the gated activation one call each instead of several torch
    operations. Layers with q and k norms (Qwen3) rotate in torch."""

    def __init__(self, kernels: cpu_kernels.CpuKernels):
        super().__init__(kernels.linear)
        self.kernels = kernels

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.kernels.layer.rms_norm(x, weight, eps)

    def linear(self, x: torch.Tensor, weight, bias: torch.Tensor | None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernels.linear(x, weight, bias, residual)

    def rotary(self, qkv: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor, heads: int,
               kv_heads: int, head_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layer.q_norm is not None:
            return super().rotary(qkv, layer, cos, sin, heads, kv_heads, head_dim, eps)
        self.kernels.layer.rotate(qkv, heads + kv_heads, head_dim, cos, sin)  # queries and keys, side by side
        return _heads_of(qkv, heads, kv_heads, head_dim)

    def gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.layer.silu_mul(gate_up)


TORCH_STEPS = TorchSteps()


def _heads_of(qkv: torch.Tensor, heads: int, kv_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A projection's rows [P, (heads + 2 kv_heads) * head_dim] as queries [P, heads, head_dim],
    keys and values [P, kv_heads, head_dim]."""
    rows = qkv.shape[0]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.reshape(rows, heads, head_dim), k.reshape(rows, kv_heads, head_dim), v.reshape(rows, kv_heads, head_dim)


def project(x: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
            head_dim: int, eps: float, steps: TorchSteps = TORCH_STEPS
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's queries (rotated), keys (rotated) and values for rows x [P, hidden]."""
    qkv = steps.linear(steps.norm(x, layer.input_norm, eps), layer.qkv, layer.qkv_bias)
    return steps.rotary(qkv, layer, cos, sin, heads, kv_heads, head_dim, eps)


def mix(x: torch.Tensor, attended: torch.Tensor, layer: _Layer, eps: float,
        steps: TorchSteps = TORCH_STEPS) -> torch.Tensor:
    """The rest of the layer: output projection, residual, MLP (SiLU-gated), residual."""
    x = steps.linear(attended, layer.o, layer.o_bias, residual=x)
    gate_up = steps.linear(steps.norm(x, layer.post_norm, eps), layer.gate_up, layer.gate_up_bias)
    return steps.linear(steps.gated(gate_up), layer.down, layer.down_bias, residual=x)


def _linear(x: torch.Tensor, weight: torch.Tensor, padded: int, piece: int, product=F.linear) -> torch.Tensor:
    """product(x, weight) (x [n, in] @ weight.T), computed on `padded` rows, in pieces of at most
    `piece` (see the module's docstring)."""
    rows = x.shape[0]
    if padded != rows:
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
    return by_row_pieces(product, piece, (0,))(x, weight)[:rows]


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [n, in] @ weight.T (+ bias) by oneDNN, `packed` being reorder_for_onednn(weight). The op
    is the one torch's inductor emits for CPU linears; it takes and returns plain tensors."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def reorder_for_onednn(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] reordered once into oneDNN's blocked layout (a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def onednn_runs(weights: Sequence[torch.Tensor]) -> bool:
    """Whether oneDNN can run products with these weights: float32 CPU tensors, and a torch build
    whose oneDNN ops exist and run on this CPU (tried once on a small product)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if not all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights):
        return False
    try:
        onednn_linear(torch.ones(ROWS, 8), reorder_for_onednn(torch.ones(4, 8)))
    except RuntimeError:
        return False
    return True


# The weights a layer's matrix products take (what the C products pack, oneDNN reorders and
# product_rows probes).
_PRODUCT_WEIGHTS = ("qkv", "o", "gate_up", "down")


def _product_weights(layers: Sequence[_Layer]) -> list[torch.Tensor]:
    return [getattr(layer, name) for layer in layers for name in _PRODUCT_WEIGHTS]


def _packed(layer: _Layer, pack) -> _Layer:
    """The layer with its products' weights in the product's layout (`pack`: the product's packing)."""
    return dataclasses.replace(layer, **{name: pack(getattr(layer, name)) for name in _PRODUCT_WEIGHTS})


def product_rows(weights: Sequence[torch.Tensor], limit: int = 256, product=F.linear) -> int:
    """The largest row count (a multiple of ROWS, at most `limit`) up to which `product` gives
    every row of x @ w.T the same bits whatever the product's row count: measured on random
    rows for each weight's shape. Products of more rows are computed in pieces of this many."""
    generator = torch.Generator().manual_seed(0)
    shapes = {tuple(w.shape): w for w in weights}
    span = limit
    for weight in shapes.values():
        x = torch.randn(limit, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
        reference = product(x[:ROWS], weight)
        for rows in range(2 * ROWS, span + 1, ROWS):
            if not torch.equal(product(x[:rows], weight)[:ROWS], reference):
                span = rows - ROWS
                break
    return span


def by_row_pieces(stage, piece: int, row_wise: tuple[int, ...]):
    """`stage` run on pieces of at most `piece` rows of its row-wise arguments (those at the
    indices `row_wise`; the stage computes each row on its own), the outputs joined back."""
    def run(*args):
        rows = args[0].shape[0]
        if rows <= piece:
            return stage(*args)
        parts = [stage(*(a[i : i + piece] if n in row_wise else a for n, a in enumerate(args)))
                 for i in range(0, rows, piece)]
        return tuple(torch.cat(p) for p in zip(*parts)) if isinstance(parts[0], tuple) else torch.cat(parts)
    return run


def _cat_bias(*linears) -> torch.Tensor | None:
    biases = [linear.bias for linear in linears]
    return None if all(b is None for b in biases) else torch.cat([b.detach() for b in biases])


class ModelRunner:
    """Runs a causal LM over sessions' caches. Not thread-safe: one caller at a time (the
    service's model worker)."""

    def __init__(self, model, vocab_size: int, max_chunk: int = MAX_CHUNK, compile: bool = False,
                 invariant: bool = True, onednn: bool = True, c_attention: bool = True, c_products: bool = True,
                 c_steps: bool = True, c_blocks: bool = True, c_layers: bool = True, c_pass: bool = True):
        config = model.config
        model_type = getattr(config, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model type {model_type!r} is not supported; specdec runs models with the Llama layout "
                f"({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
            raise UnsupportedModel(f"sliding-window attention ({window} positions) is not supported")
        self.config = config
        self.vocab_size = vocab_size
        self.max_chunk = max_chunk
        decoder = model.get_decoder()
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.eps = float(config.rms_norm_eps)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"activation {config.hidden_act!r} is not supported (SiLU-gated MLPs only)")
        self.embed = decoder.embed_tokens.weight.detach()
        self.final_norm = decoder.norm.weight.detach()
        self.lm_head = model.get_output_embeddings().weight.detach()
        self.rotary = decoder.rotary_emb
        self.layers = [self._fuse(layer) for layer in decoder.layers]
        # The dense stages, compiled (torch.compile; CUDA graphs on CUDA) or eager. Compiled passes
        # pad their rows to a power of two, so that a few shapes cover them all.
        self.compiled = compile
        # Not invariant: rows are not padded (a 1-row product takes the BLAS's faster kernel), so a
        # position's numbers may differ in the last bits with the batch it was computed in.
        self.invariant = invariant
        # The CPU kernels in C (specdec.cpu_kernels), when they build here: the attention one call
        # a layer instead of the torch blocks' thirty small operations; the products invariant at
        # any row count and reading a step's weights once.
        self.c_kernels = kernels = cpu_kernels.load() if (c_attention or c_products) and cpu_kernels.applies(
            self.dtype, self.device) else None
        # Eager products on CPU: the C kernel's (each weight packed once, a copy), else oneDNN's
        # (each weight reordered once into its blocked layout, a copy: a SmolLM2 step of 1-16 rows
        # about half F.linear's time), else F.linear. Compiled stages keep F.linear (torch.compile
        # is handed the plain weights).
        weights = [self.lm_head] + _product_weights(self.layers)
        self.products = ("c" if c_products and kernels and not compile else
                         "onednn" if onednn and not compile and onednn_runs(weights) else "torch")
        if self.products == "c":  # c_steps=False: the C products with torch's small steps (to measure them)
            self.steps = CSteps(kernels) if c_steps else TorchSteps(kernels.linear)
            # Weights dequantized from a .gguf's GGML blocks are packed back into them (a sixth of the
            # bytes for Q4_1), the products' bits unchanged (specdec.ggml_blocks); c_blocks=False
            # keeps float32 (to measure them).
            pack = functools.partial(kernels.linear.pack, blocks=c_blocks)
        elif self.products == "onednn":
            self.steps, pack = TorchSteps(onednn_linear), reorder_for_onednn
        else:
            self.steps, pack = TORCH_STEPS, None
        self.product = self.steps.product
        if pack:
            self.layers = [_packed(layer, pack) for layer in self.layers]
        self.head_weight = pack(self.lm_head) if pack else self.lm_head
        # With the C products and steps, each layer's halves around its attention are one C call
        # each (the same kernels in the same order: the same bits); c_layers=False keeps a call
        # per step (to measure them). Layers with q and k norms (Qwen3) keep the calls.
        self.fused_layers = [
            kernels.layer.fused(kernels.linear, layer.input_norm, layer.qkv, layer.qkv_bias, layer.o, layer.o_bias,
                                layer.post_norm, layer.gate_up, layer.gate_up_bias, layer.down, layer.down_bias,
                                self.eps, self.heads, self.kv_heads, self.head_dim)
            for layer in self.layers
        ] if c_layers and isinstance(self.steps, CSteps) and all(l.q_norm is None for l in self.layers) else None
        # How the products' weights are held: {"float32": n} or, for a .gguf model's, {"q4_1": n, "q8_0": m}.
        self.weight_formats = collections.Counter(
            (getattr(w, "blocks", None) or str(self.dtype).removeprefix("torch."))
            for w in [self.head_weight] + _product_weights(self.layers))
        # Invariant eager passes: products of more rows than the BLAS treats alike run in pieces:
        # the layers' span probed up to 256 rows, the LM head's up to 64 (more rows in one product
        # gain nothing there). The C products treat every row count alike.
        pieces = invariant and self.products != "c"
        self.product_rows = product_rows(_product_weights(self.layers), 256, self.product) if pieces else 1 << 30
        self.head_rows = product_rows([self.head_weight], 64, self.product) if pieces else 1 << 30
        self._eager_stages = (by_row_pieces(functools.partial(project, steps=self.steps), self.product_rows, (0, 2, 3)),
                              by_row_pieces(functools.partial(mix, steps=self.steps), self.product_rows, (0, 1)))
        self._stages = (self._compiled(project), self._compiled(mix)) if compile else self._eager_stages
        # Attention: the C kernel's, else (and on CUDA) the torch blocks.
        self.c_attention = kernels.attention if kernels and c_attention and cpu_kernels.attention_applies(
            self.dtype, self.device, self.heads, self.kv_heads, self.head_dim) else None
        # With both, a pass runs every layer in one C call (FusedLayers; the same calls in the same
        # order, so the same bits); c_pass=False keeps the calls layer by layer (to measure them).
        self.layers_pass = cpu_kernels.FusedLayers(self.fused_layers, self.c_attention) if (
            c_pass and self.fused_layers and self.c_attention is not None) else None
        self.kv_shape = KVShape(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device)
        self._cos = self._sin = torch.empty(0, self.head_dim, device=self.device)

    def _compiled(self, stage):
        """A dense stage compiled. On CUDA: one static shape per row bucket, each captured as a CUDA
        graph (mode reduce-overhead), with the weights marked as fixed addresses so that replays
        read them in place rather than copying them in."""
        if self.device.type != "cuda":
            return torch.compile(stage, dynamic=True)
        for layer in self.layers:
            for field in dataclasses.fields(layer):
                if (weight := getattr(layer, field.name)) is not None:
                    torch._dynamo.mark_static_address(weight, guard=False)
        # One compiled graph per bucket (4 .. GRAPH_MAX_ROWS rows): room beyond dynamo's default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        return torch.compile(stage, mode="reduce-overhead", dynamic=False)

    @staticmethod
    def _fuse(layer) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        with torch.no_grad():
            return _Layer(
                input_norm=layer.input_layernorm.weight.detach(),
                qkv=torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).detach(),
                qkv_bias=_cat_bias(attention.q_proj, attention.k_proj, attention.v_proj),
                q_norm=None if q_norm is None else q_norm.weight.detach(),
                k_norm=None if k_norm is None else k_norm.weight.detach(),
                o=attention.o_proj.weight.detach(),
                o_bias=None if attention.o_proj.bias is None else attention.o_proj.bias.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                gate_up_bias=_cat_bias(mlp.gate_proj, mlp.up_proj),
                down=mlp.down_proj.weight.detach(),
                down_bias=None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach(),
            )

    def warm_up(self, max_sessions: int = 1) -> int:
        """Compile (and on CUDA capture) every pass shape that passes of up to max_sessions
        sessions meet, so that no request pays for it; returns how many shapes were run. On CPU
        the compiled stages take any row count (dynamic shapes): two passes compile them."""
        if not self.compiled:
            return 0
        cuda = self.device.type == "cuda"
        largest = min(GRAPH_MAX_ROWS, _bucket(max_sessions * self.max_chunk)) if cuda else 2 * ROWS
        rows, shapes = ROWS, 0
        while rows <= largest:
            chunks = [min(self.max_chunk, rows - start) for start in range(0, rows, self.max_chunk)]
            self.forward([ForwardJob(SessionCache(), [0] * n, n - 1) for n in chunks])
            rows, shapes = rows * 2, shapes + 1
        return shapes

    def new_kv(self, capacity: int = BLOCK) -> SessionKV:
        return SessionKV(self.kv_shape, capacity)

    # --- the forward pass ----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, jobs: Sequence[ForwardJob]) -> list[ForwardResult]:
        """Logits for each job, its cache cropped to what it shares with job.tokens (at most
        job.first positions, since those whose logits are wanted are recomputed) and extended."""
        starts = []
        for job in jobs:
            if not 0 <= job.first < len(job.tokens):
                raise ValueError(f"first={job.first} outside 0..{len(job.tokens) - 1}")
            if job.tree and not 0 < job.tree_start <= job.first + 1:
                raise ValueError("a tree's nodes must follow at least one token, and their logits be wanted")
            entry = job.entry
            if entry.kv is None:
                entry.kv = self.new_kv(len(job.tokens))
            keep = min(common_prefix_len(entry.tokens[: entry.kv.length], job.tokens), job.first)
            if job.feature_layers:
                keep = self._features_kept(job, keep)
            entry.kv.crop(keep)
            entry.kv.reserve(len(job.tokens))
            entry.tokens = list(job.tokens[: entry.kv.length])
            starts.append(keep)
        pieces: list[list[torch.Tensor]] = [[] for _ in jobs]
        done = list(starts)
        while any(d < len(job.tokens) for d, job in zip(done, jobs)):
            spans = [(i, d, min(len(job.tokens), d + self.max_chunk))
                     for i, (d, job) in enumerate(zip(done, jobs)) if d < len(job.tokens)]
            for (i, _, _), logits in zip(spans, self._pass([(jobs[i], a, b) for i, a, b in spans])):
                pieces[i].append(logits)
            for i, _, end in spans:
                done[i] = end
        results = [ForwardResult(torch.cat(p).float()[:, : self.vocab_size], keep, self._features_of(job))
                   for p, keep, job in zip(pieces, starts, jobs)]
        for job in jobs:
            if job.tree:  # keep what a chain would hold: the tokens before the tree, its leading chain
                valid = job.tree_start + job.chain_len()
                job.entry.kv.crop(valid)
                job.entry.tokens = list(job.tokens[:valid])
                if job.feature_layers:
                    job.entry.features.crop(valid)
        return results

    @torch.inference_mode()
    def keep_path(self, job: ForwardJob, path: Sequence[int]) -> None:
        """Right after forward() of a tree job: make its cache hold the tokens before the tree and
        the nodes on `path` (root to leaf: what the round kept), as a chain of those tokens would,
        instead of the tree's leading chain. An off-chain node's keys, values and features are
        bitwise its chain's (its attention ran on its ancestors' chain layout) and still sit in
        the buffers' slots past the leading chain, so they move into place and the next Verify
        computes none of them again."""
        if not job.tree:
            return
        entry, start = job.entry, job.tree_start
        slots, end = [start + node for node in path], start + len(path)
        moved = list(path) != list(range(len(path)))  # else the leading chain holds it in place
        if moved:
            entry.kv.data[:, :, :, start:end] = entry.kv.data[:, :, :, slots]
        entry.kv.length = end
        if job.feature_layers and entry.features is not None and entry.features.lo <= start:
            if moved:
                entry.features.data[start:end] = entry.features.data[slots]
            entry.features.hi = end
        entry.tokens = list(job.tokens[:start]) + [job.tokens[slot] for slot in slots]

    @staticmethod
    def _features_of(job: ForwardJob) -> torch.Tensor | None:
        """The job's features: a view of its buffer, a copy for a tree (keep_path moves rows)."""
        if not job.feature_layers:
            return None
        rows = job.entry.features.read(job.features_from, len(job.tokens))
        return rows.clone() if job.tree else rows

    def feature_width(self, layers: Sequence[int]) -> int:
        return len(layers) * self.config.hidden_size

    def _features_kept(self, job: ForwardJob, keep: int) -> int:
        """How much of the cache a job that wants features can keep: positions whose features are
        wanted but not held are recomputed."""
        if not all(0 <= layer <= len(self.layers) for layer in job.feature_layers):
            raise ValueError(f"feature layers {job.feature_layers} outside 0..{len(self.layers)}")
        held = job.entry.features
        if held is None or held.layers != job.feature_layers:
            held = job.entry.features = FeatureBuffer(job.feature_layers, self.feature_width(job.feature_layers),
                                                      self.device, len(job.tokens))
        held.crop(keep)
        if not held.covers(min(job.features_from, keep), keep):
            keep = min(keep, job.features_from)
        return keep

    def _pass(self, spans: list[tuple[ForwardJob, int, int]]) -> list[torch.Tensor]:
        """One pass over positions [start, end) of each job's tokens; returns, per job, logits of
        the positions >= job.first among them ([0, V] when none). The rows of every matrix
        product are padded with zeros as _rows says (to a power of two when compiled)."""
        ids = torch.tensor([t for job, a, b in spans for t in job.tokens[a:b]], device=self.device)
        positions = torch.cat([self._positions(job, a, b) for job, a, b in spans])
        real = len(ids)
        cuda = self.device.type == "cuda"
        compiled = self.compiled and not (cuda and _bucket(real) > GRAPH_MAX_ROWS)
        project, mix = self._stages if compiled else self._eager_stages
        if compiled and cuda:
            # A new pass: CUDA graph outputs of the last one may be overwritten (none is kept).
            torch.compiler.cudagraph_mark_step_begin()
        padded = _bucket(real) if compiled else self._rows(real)
        # A tree node's position is at most its slot, so the spans' ends bound every position.
        cos, sin = self._rotary(F.pad(positions, (0, padded - real)), max(b for _, _, b in spans))
        wanted_layers = sorted({layer for job, _, _ in spans for layer in job.feature_layers})
        x = F.pad(F.embedding(ids, self.embed), (0, 0, 0, padded - real))
        outputs = {0: x} if 0 in wanted_layers else {}
        layouts = [(self._key_lists if self.c_attention else self._tree_layout)(job, a, b) for job, a, b in spans]
        fused = self.fused_layers if not compiled else None  # (the C products never pad: padded == real)
        if fused and self.layers_pass is not None:
            x = self._layers_in_one_call(spans, layouts, x, cos, sin, wanted_layers, outputs)
        else:
            for index, layer in enumerate(self.layers):
                if fused:
                    qkv = fused[index].project(x, cos, sin)
                    if self.c_attention:
                        attended = self._attention_projected(index, qkv, spans, layouts)
                    else:
                        q, k, v = _heads_of(qkv, self.heads, self.kv_heads, self.head_dim)
                        attended = self._attention(index, q, k, v, spans, layouts)
                    x = fused[index].mix(x, attended)
                else:
                    q, k, v = project(x, layer, cos, sin, self.heads, self.kv_heads, self.head_dim, self.eps)
                    attended = self._attention(index, q, k, v, spans, layouts)
                    x = mix(x, F.pad(attended, (0, 0, 0, padded - real)), layer, self.eps)
                if index + 1 in wanted_layers:
                    outputs[index + 1] = x
        row = 0
        for job, a, b in spans:
            if job.feature_layers:
                job.entry.features.write(a, torch.cat([outputs[layer][row : row + b - a] for layer in job.feature_layers],
                                                      dim=-1))
            row += b - a
        wanted, row = [], 0
        for job, a, b in spans:
            wanted.append(torch.arange(row + min(b - a, max(0, job.first - a)), row + b - a, device=self.device))
            row += b - a
        rows = torch.cat(wanted)
        if not len(rows):
            return [x.new_zeros(0, self.lm_head.shape[0]) for _ in spans]
        last = self.steps.norm(x[rows], self.final_norm, self.eps)
        logits = _linear(last, self.head_weight, self._rows(len(last)), self.head_rows, self.product)
        return list(logits.split([len(w) for w in wanted]))

    def _layers_in_one_call(self, spans: list[tuple[ForwardJob, int, int]], lists: list[cpu_kernels.KeyLists],
                            x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wanted_layers: list[int],
                            outputs: dict[int, torch.Tensor]) -> torch.Tensor:
        """Every layer of a pass in one C call (FusedLayers): the last layer's output; the outputs
        of wanted_layers (hidden-state indices, layer i's output is i + 1) into outputs."""
        last = len(self.layers)
        taps = {layer - 1: torch.empty_like(x) for layer in wanted_layers if 0 < layer < last}
        x = self.layers_pass.forward(x, cos, sin, [cpu_kernels.PassSpan(job.entry.kv.data, a, layout)
                                                   for (job, a, _), layout in zip(spans, lists)], self.scale, taps)
        outputs.update({index + 1: tap for index, tap in taps.items()})
        if last in wanted_layers:  # (the call's own output: no copy of it)
            outputs[last] = x
        self._after_layer(last - 1, spans)
        return x

    def _positions(self, job: ForwardJob, start: int, end: int) -> torch.Tensor:
        """Positions of slots [start, end) of a job: the slot itself, except a tree's nodes."""
        slots = list(range(start, min(end, job.tree_start)))
        if end > job.tree_start:
            slots += job.tree_positions()[max(0, start - job.tree_start) : end - job.tree_start]
        return torch.tensor(slots, device=self.device, dtype=torch.long)

    def _rows(self, count: int) -> int:
        """The row count an eager matrix product of `count` rows is computed on: as it is for the C
        products (they treat every count alike); else padded to a multiple of ROWS, except a
        single row when not invariant (2 and 3 rows stay padded: they are slower than 4 here)."""
        if self.products == "c" or (count == 1 and not self.invariant):
            return count
        return _padded_rows(count)

    def _attention(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans,
                   layouts: list) -> torch.Tensor:
        """Each session's new keys and values into its cache, and its queries' attention over it:
        [real rows, heads * head_dim]. `layouts`: per span, its KeyLists for the C attention, or
        its _TreeLayout (or None) for the torch blocks."""
        out, row = [], 0
        for (job, a, b), layout in zip(spans, layouts):
            kv = job.entry.kv
            kv.keys(index)[:, a:b] = k[row : row + b - a].transpose(0, 1)
            kv.values(index)[:, a:b] = v[row : row + b - a].transpose(0, 1)
            if self.c_attention:
                attended = self.c_attention.attend(q[row : row + b - a], kv.keys(index), kv.values(index), layout,
                                                   self.scale)
                out.append(attended.reshape(b - a, -1))
            else:
                out.append(self._attend(q[row : row + b - a], kv, index, a, b, layout))
            row += b - a
        self._after_layer(index, spans)
        return torch.cat(out)

    def _attention_projected(self, index: int, qkv: torch.Tensor, spans, layouts: list) -> torch.Tensor:
        """_attention for the C attention on a layer's projection rows (FusedLayer.project): each
        session's new keys and values go into its cache, and its queries are read, where the rows
        hold them, in one call: [real rows, heads * head_dim]."""
        out, row = [], 0
        for (job, a, b), layout in zip(spans, layouts):
            kv = job.entry.kv
            attended = self.c_attention.attend_projected(qkv[row : row + b - a], self.heads, a, kv.keys(index),
                                                         kv.values(index), layout, self.scale)
            out.append(attended.reshape(b - a, -1))
            row += b - a
        self._after_layer(index, spans)
        return out[0] if len(out) == 1 else torch.cat(out)

    def _after_layer(self, index: int, spans) -> None:
        """After the last layer's keys and values: each session's cache holds its spans."""
        if index == len(self.layers) - 1:
            for job, a, b in spans:
                job.entry.kv.length = b
                job.entry.tokens = list(job.tokens[:b])

    @staticmethod
    def _key_lists(job: ForwardJob, start: int, end: int) -> cpu_kernels.KeyLists:
        """For the C attention: the cache slots each of slots [start, end) attends to. A slot
        before the tree or on its leading chain reads every slot up to itself; a node off the
        chain reads the slots before the tree, then its ancestors' and its own, root first: the
        keys, in the order, that a chain of those tokens would read."""
        tree_start, chain_end = job.tree_start, job.tree_start + job.chain_len()
        prefix, extra = [], []
        for slot in range(start, end):
            if slot < chain_end:
                prefix.append(slot + 1)
                extra.append([])
                continue
            prefix.append(tree_start)
            extra.append([tree_start + node for node in _root_path(job.tree, slot - tree_start)])
        return cpu_kernels.KeyLists(prefix, extra)

    def _tree_layout(self, job: ForwardJob, start: int, end: int) -> "_TreeLayout | None":
        """For the slots [start, end) of a tree job: where each node off the tree's leading chain
        reads in attention, so that it sees what a chain of its ancestors would (the leading chain
        already does: its nodes sit where a chain's would, and the causal mask hides the others).
        None without such nodes in these slots."""
        if not job.tree:
            return None
        tree_start, chain_end = job.tree_start, job.tree_start + job.chain_len()
        if end <= chain_end:
            return None
        first_block, blocks = tree_start // BLOCK, -(-end // BLOCK)
        nodes = range(max(start, chain_end) - tree_start, end - tree_start)
        # Node i's chain layout: slot tree_start + j holds its path's j-th node (ancestors, then
        # itself); every other slot of the tail blocks reads itself (cache, or masked out).
        gather = torch.arange(first_block * BLOCK, blocks * BLOCK).repeat(len(nodes), 1)
        positions = []
        for row, node in enumerate(nodes):
            path = _root_path(job.tree, node)
            gather[row, tree_start - first_block * BLOCK : tree_start - first_block * BLOCK + len(path)] = \
                torch.tensor(path) + tree_start
            positions.append(tree_start - 1 + len(path))
        rows = [tree_start + node - start for node in nodes]
        group = self.heads // self.kv_heads
        return _TreeLayout(torch.tensor(rows, device=self.device), gather.flatten().to(self.device), first_block,
                           torch.tensor(positions, device=self.device),
                           torch.tensor([g * (end - start) + r for g in range(group) for r in rows], device=self.device))

    def _attend(self, q: torch.Tensor, kv: SessionKV, layer: int, start: int, end: int,
                tree: "_TreeLayout | None" = None) -> torch.Tensor:
        """Causal attention of queries at slots [start, end) (q: [n, heads, dim]) over the
        session's keys [0, end), block by block (see the module's docstring). A tree's nodes off
        its leading chain (`tree`) attend, in the blocks from the tree's on, to a copy of the cache
        laid out as a chain of their ancestors would be, with the same products and sums as that
        chain's: bitwise its numbers."""
        n, group = end - start, self.heads // self.kv_heads
        rows = group * n
        padded = _padded_rows(rows)
        # Rows ordered (head in group, position): [kv_heads, group * n, dim], padded.
        queries = q.reshape(n, self.kv_heads, group, self.head_dim).permute(1, 2, 0, 3).reshape(self.kv_heads, rows, -1)
        if padded != rows:
            queries = torch.cat([queries, queries.new_zeros(self.kv_heads, padded - rows, self.head_dim)], dim=1)
        blocks = -(-end // BLOCK)
        keys = kv.keys(layer)[:, : blocks * BLOCK].reshape(self.kv_heads, blocks, BLOCK, self.head_dim)
        values = kv.values(layer)[:, : blocks * BLOCK].reshape(self.kv_heads, blocks, BLOCK, self.head_dim)
        scores = torch.matmul(queries[:, None], keys.transpose(-1, -2)).float() * self.scale  # [h, blocks, rows, BLOCK]
        query_at = torch.arange(start, end, device=q.device)
        if tree is not None:
            query_at[tree.rows] = tree.positions
            node_rows = tree.query_rows
            tail_keys, tail_values = kv.data[layer][:, :, tree.gather].reshape(
                2, self.kv_heads, len(tree.rows), -1, BLOCK, self.head_dim)  # [h, nodes, tail blocks, BLOCK, dim]
            node_queries = self._node_rows(queries[:, node_rows][:, None], group)
            tail_scores = torch.matmul(node_queries, tail_keys.transpose(-1, -2)).float() * self.scale
            scores[:, tree.first_block :, node_rows] = self._block_rows(tail_scores, group)
        query_at = torch.cat([query_at.repeat(group), query_at.new_full((padded - rows,), start)])
        key_at = torch.arange(blocks * BLOCK, device=q.device).reshape(blocks, 1, BLOCK)
        scores = scores.masked_fill(key_at > query_at[None, :, None], float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=(1, 3), keepdim=True))
        # Across blocks, a running sum (cumsum adds block by block, in order, whatever the row's
        # index or the row count); torch's sum over that dimension is not row-invariant.
        total = weights.sum(-1).cumsum(1)[:, -1]  # [h, rows]
        mixed = torch.matmul(weights.to(values.dtype), values)  # [h, blocks, rows, dim]
        if tree is not None:
            node_weights = self._node_rows(weights[:, tree.first_block :, node_rows].to(values.dtype), group)
            mixed[:, tree.first_block :, node_rows] = self._block_rows(torch.matmul(node_weights, tail_values), group)
        mixed = mixed.cumsum(1)[:, -1]  # [h, rows, dim]
        out = (mixed.float() / total[..., None]).to(q.dtype)[:, :rows]
        return out.reshape(self.kv_heads, group, n, self.head_dim).permute(2, 0, 1, 3).reshape(n, -1)

    @staticmethod
    def _node_rows(x: torch.Tensor, group: int) -> torch.Tensor:
        """Per node, its group's rows padded as a lone position's would be: [h, blocks, group *
        nodes, d] (rows ordered head in group, node) to [h, nodes, blocks, padded rows, d]."""
        h, blocks, rows, d = x.shape
        x = x.reshape(h, blocks, group, rows // group, d).permute(0, 3, 1, 2, 4)
        padded = _padded_rows(group)
        return F.pad(x, (0, 0, 0, padded - group)) if padded != group else x

    @staticmethod
    def _block_rows(x: torch.Tensor, group: int) -> torch.Tensor:
        """_node_rows undone: [h, nodes, blocks, padded rows, d] to [h, blocks, group * nodes, d]."""
        h, nodes, blocks = x.shape[:3]
        return x[:, :, :, :group].permute(0, 2, 3, 1, 4).reshape(h, blocks, group * nodes, x.shape[-1])

    def _rotary(self, positions: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [len(positions), head_dim] from per-position tables, grown on demand."""
        if upto > self._cos.shape[0]:
            size = max(upto, 2 * self._cos.shape[0], 1024)
            every = torch.arange(size, device=self.device)[None]
            cos, sin = self.rotary(torch.empty(1, dtype=self.dtype, device=self.device), every)
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[positions], self._sin[positions]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
