"""The runner's CPU kernels in C, built on first use with the machine's C compiler into one library
and loaded through ctypes: its attention (cpu_attention.c), its matrix products (cpu_linear.c) and
a layer's small steps between them (cpu_layer.c: RMS norms, rotary embedding, gated activation),
which cpu_layer.c also strings together into a layer's two halves around its attention
(FusedLayer: one call each), and those with the attention into a pass through every layer
(FusedLayers: one call a pass, so that a step's dispatch from Python is one call).

Why C: at a step's few rows the torch attention (specdec.runner's blocks, invariant by its fixed
blocks and running sums) is some thirty small operations a layer, and on this project's 2-core
machines their dispatch costs more than their arithmetic: about a quarter of a one-token step,
and a tree's nodes off its leading chain cost as much again (bench/RESULTS.md). The C kernel does
one call a layer, and a tree node reads its ancestors' slots where they are instead of a copy of
the cache laid out as their chain. The products: a BLAS changes its kernel (and its rounding) with
the row count, so the runner had to pad rows and cut large products into pieces to stay invariant
(oneDNN's, four rows at least); the C product is invariant at any row count (each output one
chain of multiply-adds in order) and reads a step's weights once for up to twelve rows (on AVX2
three, or six over half a tile at a time), at the speed memory streams them. The small steps: in torch each is several operations (a norm is
seven) whose dispatch, thirty layers a step, cost more than their arithmetic. Every kernel's
numbers are invariant by construction (see the .c files).

The library is cached under $SPECDEC_CACHE_DIR (default ~/.cache/specdec), named by a hash of the
sources, the flags, the compiler and this CPU's flags (it is built with -march=native), so a
changed kernel or another machine builds its own. Without a C compiler the runner keeps its torch
attention and oneDNN's products (load() returns None, and says why in the log).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec import ggml_blocks
from specdec.models import default_cache_dir

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_attention.c", "cpu_linear.c", "cpu_layer.c"))
HEADERS = (Path(__file__).with_name("cpu_vector.h"),)
LINEAR_TILE = 32  # outputs in one tile of a packed weight: cpu_linear.c's TILE
FLOAT32, HALF = 0, 1  # cpu_linear.c's format numbers
BLOCK_FORMATS = {ggml_blocks.Q4_1: 2, ggml_blocks.Q8_0: 3}  # and those of the GGML blocks
FLAGS = ("-O2", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared")
# OpenMP: the kernels split long calls among the threads of the OpenMP team torch already runs
# (torch's wheels ship libgomp.so.1, which the kernel's libgomp.so.1 resolves to once torch is
# loaded). A compiler without OpenMP builds them single-threaded.
OPENMP = ("-fopenmp",)


def _heads_apart(cache: torch.Tensor, dim: int) -> bool:
    """A cache [heads, positions, dim] whose heads lie a whole number of positions apart, each
    head's positions contiguous."""
    return cache.dim() == 3 and cache.shape[2] == dim and cache.stride(2) == 1 and cache.stride(1) == dim \
        and cache.stride(0) % dim == 0 and cache.stride(0) >= cache.shape[1] * dim


class CpuAttention:
    """specdec_attend, loaded: attention of query rows over one layer's cache, each row over its
    own key slots (KeyLists)."""

    def __init__(self, library: ctypes.CDLL, threads: int = 0):
        self.threads = threads  # the most threads a call may use; 0: torch's thread count
        self.openmp = _openmp(library)  # False: built without OpenMP, every call on one thread
        self._attend = library.specdec_attend
        self._attend.restype = ctypes.c_int
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        self._attend.argtypes = [pointer, pointer, pointer, integer, pointer, pointer, pointer, integer, integer,
                                 integer, integer, integer, ctypes.c_float, pointer, integer]
        self._attend_projected = library.specdec_attend_projected
        self._attend_projected.restype = ctypes.c_int
        self._attend_projected.argtypes = [pointer, integer, integer] + self._attend.argtypes[1:]

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lists: "KeyLists",
               scale: float) -> torch.Tensor:
        """q [rows, heads, dim] over keys and values [kv_heads, positions, dim] (float32, CPU; each
        head's positions contiguous, the heads possibly further apart, as in a view of a cache from
        a later position on): [rows, heads, dim]."""
        dim = q.shape[-1]
        if not (_heads_apart(keys, dim) and keys.stride() == values.stride()):
            raise ValueError("the CPU attention kernel reads each head's keys and values contiguous")
        q = q.contiguous()
        rows, heads, _ = q.shape
        out = torch.empty_like(q)
        status = self._attend(q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0) // dim,
                              lists.prefix.data_ptr(), lists.extra.data_ptr(), lists.n_extra.data_ptr(),
                              lists.extra.shape[1], rows, heads, keys.shape[0], dim, scale, out.data_ptr(),
                              self.threads or torch.get_num_threads())
        if status:
            raise MemoryError("the CPU attention kernel could not allocate its buffers")
        return out

    def attend_projected(self, qkv: torch.Tensor, heads: int, slot: int, keys: torch.Tensor, values: torch.Tensor,
                         lists: "KeyLists", scale: float) -> torch.Tensor:
        """Rows of a layer's projection qkv [rows, (heads + 2 kv_heads) dim] (contiguous; queries,
        keys and values side by side): their keys and values written into the cache at slots
        [slot, slot + rows), then their queries' attention as attend gives it: [rows, heads, dim]."""
        kv_heads, capacity, dim = keys.shape
        rows = qkv.shape[0]
        if (not (qkv.is_contiguous() and keys.is_contiguous() and values.is_contiguous())
                or qkv.shape[1] != (heads + 2 * kv_heads) * dim or values.shape != keys.shape
                or not 0 <= slot <= capacity - rows):
            raise ValueError(f"cannot attend rows {tuple(qkv.shape)} at slot {slot} of a cache {tuple(keys.shape)}")
        out = qkv.new_empty(rows, heads, dim)
        status = self._attend_projected(qkv.data_ptr(), qkv.shape[1], slot, keys.data_ptr(), values.data_ptr(),
                                        capacity, lists.prefix.data_ptr(), lists.extra.data_ptr(),
                                        lists.n_extra.data_ptr(), lists.extra.shape[1], rows, heads, kv_heads, dim,
                                        scale, out.data_ptr(), self.threads or torch.get_num_threads())
        if status:
            raise MemoryError("the CPU attention kernel could not allocate its buffers")
        return out


@dataclass(frozen=True)
class PackedWeight:
    """A weight [outs, in] laid out for specdec_linear (float32) or specdec_linear_half (float16):
    tiles of LINEAR_TILE outputs, each tile [in, LINEAR_TILE] contiguous ([tiles, in, LINEAR_TILE];
    the last tile's outputs past `outs` zero). Or, `blocks` set ("q4_1", "q8_0"), for
    specdec_linear_blocks: a float32 weight found to be that GGML format's dequantization, its
    blocks in tiles (uint8, specdec.ggml_blocks.packed)."""

    data: torch.Tensor
    outs: int
    blocks: str | None = None

    @staticmethod
    def of(weight: torch.Tensor) -> PackedWeight:
        outs, inputs = weight.shape
        tiles = -(-outs // LINEAR_TILE)
        padded = torch.zeros(tiles * LINEAR_TILE, inputs, dtype=weight.dtype, device=weight.device)
        padded[:outs] = weight
        return PackedWeight(padded.view(tiles, LINEAR_TILE, inputs).transpose(1, 2).contiguous(), outs)

    @staticmethod
    def of_blocks(blocks: ggml_blocks.Blocks) -> PackedWeight:
        return PackedWeight(ggml_blocks.packed(blocks, LINEAR_TILE), blocks.codes.shape[0], blocks.format)

    @functools.cached_property
    def inputs(self) -> int:
        """The weight's input count."""
        # blocks: [tiles, in / BLOCK, block bytes]; else [tiles, in, LINEAR_TILE]
        return self.data.shape[1] * (ggml_blocks.BLOCK if self.blocks else 1)

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's shape, [outs, in]."""
        return self.outs, self.inputs


class CpuLinear:
    """specdec_linear, loaded: x @ w.T (+ bias) with w packed (PackedWeight), each output one chain
    of multiply-adds in order, so a row's outputs do not depend on the call's other rows."""

    def __init__(self, library: ctypes.CDLL, threads: int = 0):
        if library.specdec_linear_tile() != LINEAR_TILE:
            raise OSError(f"the product kernel packs {library.specdec_linear_tile()} outputs a tile, not {LINEAR_TILE}")
        self.threads = threads  # the most threads a call may use; 0: torch's thread count
        self.openmp = _openmp(library)
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        self._linear, self._linear_half = library.specdec_linear, library.specdec_linear_half
        for function in (self._linear, self._linear_half):
            function.restype = None
            function.argtypes = [pointer, integer, integer, pointer, integer, pointer, pointer, pointer, integer]
        self._linear_blocks = library.specdec_linear_blocks
        self._linear_blocks.restype = None
        self._linear_blocks.argtypes = [pointer, integer, integer, pointer, integer, integer, pointer, pointer, pointer,
                                        integer]
        # Whether weights packed in float16, or in GGML blocks (half-precision scales), compute here
        # (the CPU has AVX-512, or AVX2 and F16C).
        self.half = bool(library.specdec_linear_half_built())
        # The vectors it computes in (16 floats on AVX-512, 8 on AVX2) and the most rows a pass
        # holds in registers (12; 6 on AVX2, over half a tile: AVX2 has half the vector registers).
        self.lanes, self.rows_a_pass = library.specdec_linear_lanes(), library.specdec_linear_rows_a_pass()

    def pack(self, weight: torch.Tensor, blocks: bool = True) -> PackedWeight:
        """`weight` packed for these products: in GGML blocks where it is exactly some block
        format's dequantization and this library computes blocks (`blocks` True), else as it is."""
        found = ggml_blocks.factor(weight) if blocks and self.half else None
        return PackedWeight.of_blocks(found) if found is not None else PackedWeight.of(weight)

    def format_of(self, weight: PackedWeight) -> int:
        """cpu_linear.c's number for the weight's format (FLOAT32, HALF, or the GGML blocks'), where
        this library computes it."""
        format = self._format(weight)
        if format is None:
            raise ValueError(f"this library does not compute {weight.blocks or weight.data.dtype} weights")
        return format

    def _format(self, weight: PackedWeight) -> int | None:
        if weight.blocks is not None:
            return BLOCK_FORMATS[weight.blocks] if self.half else None
        if weight.data.dtype == torch.float16:
            return HALF if self.half else None
        return FLOAT32 if weight.data.dtype == torch.float32 else None

    def computes(self, dtype: torch.dtype | str) -> bool:
        """Whether weights of `dtype` (or in the GGML block format of that name) can be packed for
        this library's products."""
        return dtype == torch.float32 or ((dtype == torch.float16 or dtype in BLOCK_FORMATS) and self.half)

    def __call__(self, x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, in] (float32, CPU) @ weight.T (+ bias [outs]) (+ residual [rows, outs]): [rows, outs].
        The weight is packed in float32, or in float16 where `half` says this library computes it."""
        x = x.contiguous()
        rows, inputs = x.shape
        format = self._format(weight)
        # (Checked with the tensors' cheapest properties: the feature drafter makes some 45 calls a
        # proposal, most of them microseconds of arithmetic.)
        if (format is None or inputs != weight.inputs or not _cpu_float32(x) or not weight.data.is_cpu
                or (bias is not None and (bias.shape != (weight.outs,) or not _cpu_float32(bias)))
                or (residual is not None and (residual.shape != (rows, weight.outs) or not _cpu_float32(residual)))):
            raise ValueError(f"a product of x {tuple(x.shape)} {x.dtype} with a weight {weight.shape}, bias "
                             f"{None if bias is None else tuple(bias.shape)} and residual "
                             f"{None if residual is None else tuple(residual.shape)}: shapes do not match")
        # Contiguous copies are held here: a temporary's memory is freed once its pointer is taken.
        bias, residual = (None if t is None else t.contiguous() for t in (bias, residual))
        out = torch.empty(rows, weight.outs, dtype=x.dtype)
        threads = self.threads or torch.get_num_threads()
        if format in BLOCK_FORMATS.values():
            self._linear_blocks(x.data_ptr(), rows, inputs, weight.data.data_ptr(), format,
                                weight.outs, _pointer(bias), _pointer(residual), out.data_ptr(), threads)
        else:
            (self._linear_half if format == HALF else self._linear)(
                x.data_ptr(), rows, inputs, weight.data.data_ptr(), weight.outs, _pointer(bias), _pointer(residual),
                out.data_ptr(), threads)
        return out


class CpuLayer:
    """specdec_rms_norm, specdec_rotate and specdec_silu_mul, loaded: a layer's small steps, each
    row on its own (float32, CPU)."""

    def __init__(self, library: ctypes.CDLL):
        pointer, integer = ctypes.c_void_p, ctypes.c_int
        self._norm, self._rotate, self._silu_mul = (library.specdec_rms_norm, library.specdec_rotate,
                                                    library.specdec_silu_mul)
        for function in (self._norm, self._rotate, self._silu_mul):
            function.restype = None
        self._norm.argtypes = [pointer, integer, integer, pointer, ctypes.c_float, pointer]
        self._rotate.argtypes = [pointer, integer, integer, integer, integer, pointer, pointer]
        self._silu_mul.argtypes = [pointer, integer, integer, pointer]
        self._project, self._mix = library.specdec_layer_project, library.specdec_layer_mix
        for function in (self._project, self._mix):
            function.restype = ctypes.c_int
        self._project.argtypes = [pointer, pointer, integer, pointer, pointer, pointer, integer]
        self._mix.argtypes = [pointer, pointer, pointer, integer, pointer, integer]
        self._layers_forward = library.specdec_layers_forward
        self._layers_forward.restype = ctypes.c_int
        self._layers_forward.argtypes = [pointer, integer, pointer, integer, ctypes.c_float, pointer, integer, pointer,
                                         pointer, pointer, pointer, integer, integer]

    def fused(self, linear: "CpuLinear", input_norm: torch.Tensor, qkv: PackedWeight, qkv_bias: torch.Tensor | None,
              o: PackedWeight, o_bias: torch.Tensor | None, post_norm: torch.Tensor, gate_up: PackedWeight,
              gate_up_bias: torch.Tensor | None, down: PackedWeight, down_bias: torch.Tensor | None, eps: float,
              heads: int, kv_heads: int, head_dim: int) -> "FusedLayer":
        """A Llama-layout decoder layer (without q and k norms) as two calls around its attention
        (FusedLayer), its products by `linear`'s kernels on the weights as packed for them."""
        return FusedLayer(self, linear, locals())

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Llama's RMSNorm of rows x [rows, dim]."""
        x, weight = x.contiguous(), weight.contiguous()
        out = torch.empty_like(x)
        self._norm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr())
        return out

    def rotate(self, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """In place: the first `heads` heads of each row of x [rows, width] (contiguous) rotated by
        the rows' cos and sin [rows, head_dim] (Hugging Face's rotate_half layout)."""
        if (not x.is_contiguous() or heads * head_dim > x.shape[1] or head_dim % 2
                or cos.shape != (x.shape[0], head_dim) or sin.shape != cos.shape):
            raise ValueError(f"cannot rotate {heads} heads of {head_dim} in rows {tuple(x.shape)} by "
                             f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)}")
        cos, sin = cos.contiguous(), sin.contiguous()
        self._rotate(x.data_ptr(), x.shape[0], x.shape[1], heads, head_dim, cos.data_ptr(), sin.data_ptr())

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of rows gate_up [rows, 2 * inner] = (gate, up): [rows, inner]."""
        gate_up = gate_up.contiguous()
        rows, width = gate_up.shape
        out = gate_up.new_empty(rows, width // 2)
        self._silu_mul(gate_up.data_ptr(), rows, width // 2, out.data_ptr())
        return out


class _Weight(ctypes.Structure):  # cpu_layer.c's Weight
    _fields_ = [("packed", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("format", ctypes.c_int),
                ("inputs", ctypes.c_int), ("outs", ctypes.c_int)]


class _LayerWeights(ctypes.Structure):  # cpu_layer.c's Layer
    _fields_ = [("qkv", _Weight), ("o", _Weight), ("gate_up", _Weight), ("down", _Weight),
                ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("eps", ctypes.c_float),
                ("hidden", ctypes.c_int), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int)]


class FusedLayer:
    """One decoder layer's two halves around its attention, one C call each (cpu_layer.c's
    specdec_layer_project and specdec_layer_mix): the same kernels in the same order as the
    runner's calls one by one (CSteps), so the same bits, without a Python call per step. The
    weights' pointers are taken once here; the tensors are kept so that they stay valid."""

    def __init__(self, layer: CpuLayer, linear: "CpuLinear", parts: dict):
        kept = {name: value.contiguous() if isinstance(value, torch.Tensor) else value
                for name, value in parts.items() if name not in ("self", "linear")}

        def weight(name: str) -> _Weight:
            packed, bias = kept[name], kept[name + "_bias"]
            outs, inputs = packed.shape
            if bias is not None and (bias.shape != (outs,) or bias.dtype != torch.float32):
                raise ValueError(f"{name}'s bias does not match its weight {packed.shape}")
            return _Weight(packed.data.data_ptr(), _pointer(bias), linear.format_of(packed), inputs, outs)

        hidden = kept["input_norm"].shape[0]
        if {kept[name].shape[0] for name in ("o", "down")} != {hidden}:
            raise ValueError("the layer's products do not map its hidden size back to itself")
        self._layer, self._linear, self._kept = layer, linear, kept
        self.weights = _LayerWeights(weight("qkv"), weight("o"), weight("gate_up"), weight("down"),
                                     kept["input_norm"].data_ptr(), kept["post_norm"].data_ptr(), kept["eps"],
                                     hidden, kept["heads"], kept["kv_heads"], kept["head_dim"])
        self.hidden, self.qkv_width = hidden, kept["qkv"].shape[0]
        self._pointer = ctypes.byref(self.weights)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rows x [rows, hidden] normed, projected to queries, keys and values [rows, qkv width],
        the queries and keys rotated by cos and sin [rows, head_dim]."""
        rows = x.shape[0]
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        if self.weights.qkv.inputs != self.hidden:  # (the feature drafter's, whose input is twice as wide)
            raise ValueError(f"this layer's projection takes {self.weights.qkv.inputs} inputs, not its hidden size")
        if x.shape[1] != self.hidden or cos.shape != (rows, self.weights.head_dim) or sin.shape != cos.shape:
            raise ValueError(f"a layer's projection of rows {tuple(x.shape)} by cos {tuple(cos.shape)}")
        qkv = x.new_empty(rows, self.qkv_width)
        self._run(self._layer._project(self._pointer, x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(),
                                       qkv.data_ptr(), self._threads()))
        return qkv

    def mix(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the layer for rows x [rows, hidden] and their attention [rows, heads *
        head_dim]: the output projection and the MLP, each added to the rows it took."""
        rows = x.shape[0]
        x, attended = x.contiguous(), attended.contiguous()
        if x.shape[1] != self.hidden or attended.shape != (rows, self.weights.o.inputs):
            raise ValueError(f"a layer's mix of rows {tuple(x.shape)} with attention {tuple(attended.shape)}")
        out = torch.empty_like(x)
        self._run(self._layer._mix(self._pointer, x.data_ptr(), attended.data_ptr(), rows, out.data_ptr(),
                                   self._threads()))
        return out

    def _threads(self) -> int:
        return self._linear.threads or torch.get_num_threads()

    @staticmethod
    def _run(status: int) -> None:
        if status:
            raise MemoryError("the CPU layer kernel could not allocate its buffers")


class _Span(ctypes.Structure):  # cpu_layer.c's Span
    _fields_ = [("kv", ctypes.c_void_p), ("capacity", ctypes.c_int), ("slot", ctypes.c_int), ("rows", ctypes.c_int),
                ("prefix", ctypes.c_void_p), ("extra", ctypes.c_void_p), ("n_extra", ctypes.c_void_p),
                ("max_extra", ctypes.c_int)]


@dataclass(frozen=True)
class PassSpan:
    """One session's rows in a pass through FusedLayers: its cache (SessionKV.data, [layers, 2,
    kv_heads, capacity, head_dim]), where its rows go in it (slots [slot, slot + rows)) and the key
    slots each row reads (KeyLists, a row each)."""

    kv: torch.Tensor
    slot: int
    lists: "KeyLists"

    @property
    def rows(self) -> int:
        return self.lists.prefix.shape[0]


class FusedLayers:
    """A model's FusedLayers as one C call a pass (cpu_layer.c's specdec_layers_forward): each
    layer's project over every row, its attention session by session (CpuAttention.attend_projected)
    and its mix over every row, in that order, without a return to Python between layers; the
    same calls on the same numbers, so the same bits as the layers called one at a time."""

    def __init__(self, layers: list[FusedLayer], attention: CpuAttention):
        first = layers[0].weights
        shapes = {(l.hidden, l.qkv_width, l.weights.heads, l.weights.kv_heads, l.weights.head_dim) for l in layers}
        if len(shapes) != 1 or first.qkv.inputs != first.hidden:
            raise ValueError("one pass through layers needs layers of one shape, projecting their hidden size")
        self._fused, self._attention = layers, attention  # (kept: their weights' pointers are in the array)
        self._layer = layers[0]._layer
        self._array = (_LayerWeights * len(layers))(*[layer.weights for layer in layers])
        self.hidden, self.heads, self.kv_heads, self.head_dim = (first.hidden, first.heads, first.kv_heads,
                                                                 first.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spans: list[PassSpan], scale: float,
                taps: dict[int, torch.Tensor]) -> torch.Tensor:
        """Rows x [rows, hidden] (the spans' rows in order) through every layer: the last layer's
        output [rows, hidden]; each span's rows' keys and values written into its cache; taps:
        layer index -> a [rows, hidden] tensor that receives that layer's output."""
        rows = x.shape[0]
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        layers = len(self._fused)
        if (x.shape[1] != self.hidden or cos.shape != (rows, self.head_dim) or sin.shape != cos.shape
                or sum(span.rows for span in spans) != rows or not all(self._fits(span) for span in spans)
                or any(not 0 <= i < layers or t.shape != x.shape or not t.is_contiguous() for i, t in taps.items())):
            raise ValueError(f"a pass of rows {tuple(x.shape)} in sessions' spans "
                             f"{[(tuple(span.kv.shape), span.slot, span.rows) for span in spans]}")
        array = (_Span * len(spans))(*[
            _Span(span.kv.data_ptr(), span.kv.shape[3], span.slot, span.rows, span.lists.prefix.data_ptr(),
                  span.lists.extra.data_ptr(), span.lists.n_extra.data_ptr(), span.lists.extra.shape[1])
            for span in spans])
        tapped = None
        if taps:
            tapped = (ctypes.c_void_p * layers)()
            for index, tensor in taps.items():
                tapped[index] = tensor.data_ptr()
        out = torch.empty_like(x)
        status = self._layer._layers_forward(
            self._array, layers, array, len(spans), scale, x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), tapped,
            out.data_ptr(), self._fused[0]._threads(), self._attention.threads or torch.get_num_threads())
        if status:
            raise MemoryError("the CPU layers could not allocate their buffers, or the attention refused its keys")
        return out

    def _fits(self, span: PassSpan) -> bool:
        """A span's cache has the layers' shape and room for its rows."""
        kv, capacity = span.kv, span.kv.shape[3] if span.kv.dim() == 5 else 0
        return (kv.is_contiguous() and kv.dtype == torch.float32
                and tuple(kv.shape) == (len(self._fused), 2, self.kv_heads, capacity, self.head_dim)
                and 0 <= span.slot <= capacity - span.rows)


@dataclass(frozen=True)
class CpuKernels:
    """The library, loaded: its attention, its products and a layer's small steps."""

    attention: CpuAttention
    linear: CpuLinear
    layer: CpuLayer

    @property
    def openmp(self) -> bool:
        return self.attention.openmp


class KeyLists:
    """Which cache slots each query row attends to, in order: slots [0, prefix[r]), then
    extra[r, :n_extra[r]] (int32 tensors, built once a pass and read by every layer)."""

    def __init__(self, prefix: list[int], extra: list[list[int]]):
        width = max((len(e) for e in extra), default=0)
        self.prefix = torch.tensor(prefix, dtype=torch.int32)
        self.n_extra = torch.tensor([len(e) for e in extra], dtype=torch.int32)
        self.extra = torch.tensor([e + [0] * (width - len(e)) for e in extra], dtype=torch.int32).reshape(
            len(prefix), width)


def applies(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernels compute for such a model's weights: float32 on CPU."""
    return device.type == "cpu" and dtype == torch.float32


def attention_applies(dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the attention kernel handles such a model: float32 on CPU, head_dim a multiple of 8."""
    return applies(dtype, device) and head_dim % 8 == 0 and heads % kv_heads == 0


def c_compiler() -> str | None:
    """The C compiler the kernels are built with: $CC, else cc, else gcc; None without one."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def load() -> CpuKernels | None:
    """The kernels, built if this machine has no copy yet; None without a working C compiler."""
    compiler = c_compiler()
    if not compiler:
        log.warning("no C compiler (cc, gcc or $CC): the runner keeps torch's attention and oneDNN's products")
        return None
    try:
        library = ctypes.CDLL(str(_library(compiler)))
        return CpuKernels(CpuAttention(library), CpuLinear(library), CpuLayer(library))
    except subprocess.CalledProcessError as error:
        log.warning("the CPU kernels did not build (%s: %s): the runner keeps torch's attention and oneDNN's "
                    "products", compiler, error.stderr.strip()[-2000:])
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("the CPU kernels did not build or load (%s): the runner keeps torch's attention and oneDNN's "
                    "products", error)
    return None


def _openmp(library: ctypes.CDLL) -> bool:
    return bool(library.specdec_openmp())


def _cpu_float32(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.float32 and tensor.is_cpu


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _library(compiler: str) -> Path:
    """The kernels' library for this machine, built if missing: with OpenMP, or without it where
    that build failed before (its library then exists, so a compiler without OpenMP is not asked
    again at every start)."""
    machine = _compiler_version(compiler) + platform.machine() + _cpu_flags()
    with_openmp, alone = (default_cache_dir() / f"cpu_kernels-{_build_key(compiler, flags, machine)}.so"
                          for flags in (FLAGS + OPENMP, FLAGS))
    for library in (with_openmp, alone):
        if library.exists():
            return library
    try:
        build(compiler, FLAGS + OPENMP, with_openmp)
        return with_openmp
    except subprocess.CalledProcessError:
        log.warning("%s cannot build with OpenMP: the CPU kernels run on one thread", compiler)
    build(compiler, FLAGS, alone)
    return alone


def _build_key(compiler: str, flags: tuple[str, ...], machine: str) -> str:
    """A library's name: a hash of the sources, the command, the compiler's version and the CPU."""
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS))
    digest.update(" ".join((compiler,) + flags).encode())
    digest.update(machine.encode())
    return digest.hexdigest()[:16]


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build(compiler: str, flags: tuple[str, ...], library: Path, sources: tuple[Path, ...] = SOURCES) -> None:
    """Compiles `sources` (the kernels', or another checkout's: bench.kernels_ab) into `library`,
    through a temporary file renamed into place, so that processes building at once (services
    starting together) never load a half-written library."""
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
    os.close(handle)
    try:
        subprocess.run([compiler, *flags, *map(str, sources), "-o", partial, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
