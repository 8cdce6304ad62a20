"""A float32 weight that came from one of GGML's block formats, found back in that format exactly,
so that the C product kernel (cpu_linear.c) reads 4 or 8 bits a weight instead of 32.

A `.gguf` model (the default target, SmolLM2-135M-Instruct Q4_1) is dequantized to float32 when
it loads, and those float32 numbers are the model: the target's output is what they compute.
A one-row product reads every weight once and does little arithmetic on it, so it runs at the
speed memory streams the weights; the same weights in their GGML blocks are a sixth of the bytes
(Q4_1) or a quarter (Q8_0). The kernel widens each block back to the same float32 numbers in
registers (the dequantization is exact arithmetic, see cpu_linear.c) and multiplies them in the
same order, so every product has the same bits as on the float32 weights.

Nothing here reads the `.gguf` file: a weight's blocks are found from its float32 numbers and
then checked, every weight, bit for bit. A weight that is not exactly some block format's
dequantization (a model stored in float32 or bfloat16, a block that does not factor) stays in
float32.

GGML's formats, per block of BLOCK consecutive inputs of one output (one row of the weight):
  Q4_1: w = d * q + m, d and m float16, q in 0..15 (d * q exact in float32: 11 + 4 bits)
  Q8_0: w = d * q, d float16, q in -128..127 (exact in float32: 11 + 8 bits)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # inputs in one of GGML's blocks (cpu_linear.c's BLOCK)
Q4_1, Q8_0 = "q4_1", "q8_0"
PROBE_ROWS = 32


@dataclass(frozen=True)
class Blocks:
    """A weight [outs, in] as GGML blocks: `scale` (d) and `offset` (m, Q4_1 only) [outs, in /
    BLOCK] float16, `codes` (q) [outs, in] (uint8 for Q4_1, int8 for Q8_0)."""

    format: str
    scale: torch.Tensor
    offset: torch.Tensor | None
    codes: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """The float32 weight these blocks stand for, as GGML computes it: d * q (exact in float32),
        then + m (one rounding)."""
        outs, inputs = self.codes.shape
        value = self.scale.float()[..., None] * self.codes.view(outs, -1, BLOCK).float()
        if self.offset is not None:
            value = value + self.offset.float()[..., None]
        return value.view(outs, inputs)


def factor(weight: torch.Tensor) -> Blocks | None:
    """The GGML blocks whose dequantization is bit for bit `weight` [outs, in] (float32), trying
    Q4_1 then Q8_0; None where neither format gives every bit back. A weight's first rows are
    tried alone first, so that a model of plain float32 weights costs little."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK or not weight.numel():
        return None
    weight = weight.detach().contiguous()
    if len(weight) > PROBE_ROWS and _factor(weight[:PROBE_ROWS]) is None:
        return None
    return _factor(weight)


def _factor(weight: torch.Tensor) -> Blocks | None:
    if not torch.isfinite(weight).all():
        return None
    for found in (_q4_1(weight), quantized(weight, Q8_0)):
        if found is not None and _same_bits(found.dequantized(), weight):
            return found
    return None


def quantized(weight: torch.Tensor, format: str) -> Blocks:
    """`weight` [outs, in] (float32, in a multiple of BLOCK) rounded into a GGML block format as
    GGML's quantizer does: Q8_0 d = max |w| / 127; Q4_1 m = min w, d = (max w - m) / 15 (d and m
    stored in float16), each code the nearest within range; unlike GGML's, the codes are rounded
    against the stored float16 d, the one dequantization multiplies by. For weights that are only
    read (the feature drafter's, whose products merely steer the drafts): fewer bytes a step."""
    if format not in (Q4_1, Q8_0):
        raise ValueError(f"{format!r} is not a GGML block format this kernel reads ({Q4_1}, {Q8_0})")
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"a weight {tuple(weight.shape)} does not split into blocks of {BLOCK} inputs")
    blocks = weight.detach().float().contiguous().view(weight.shape[0], -1, BLOCK)
    if format == Q8_0:
        scale = (blocks.abs().amax(-1) / 127).half()
        return Blocks(Q8_0, scale, None, _codes(blocks, scale, -128, 127, torch.int8))
    offset = blocks.amin(-1).half()
    above = blocks - offset.float()[..., None]
    scale = (above.amax(-1) / 15).half()
    return Blocks(Q4_1, scale, offset, _codes(above, scale, 0, 15, torch.uint8))


def _q4_1(weight: torch.Tensor) -> Blocks | None:
    """Q4_1: the block's least value is its offset m (its code is 0: GGML quantizes the minimum to
    0), its greatest is m + 15 d (GGML quantizes the maximum to 15). The codes are rounded from
    float32 differences, close enough to pick the integer; `factor` checks every bit after."""
    offset = weight.view(weight.shape[0], -1, BLOCK).amin(-1)
    if not torch.equal(offset.half().float(), offset):
        return None
    return quantized(weight, Q4_1)


def _codes(values: torch.Tensor, scale: torch.Tensor, low: int, high: int, dtype: torch.dtype) -> torch.Tensor:
    """round(values / scale) within [low, high] ([outs, in]; 0 where the scale is 0)."""
    step = scale.float()[..., None]
    codes = torch.round(values / torch.where(step > 0, step, 1.0)).clamp(low, high)
    return torch.where(step > 0, codes, 0.0).to(dtype).flatten(1)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def packed(blocks: Blocks, tile: int) -> torch.Tensor:
    """The blocks laid out for cpu_linear.c (uint8 [tiles, in / BLOCK, block bytes]): tiles of
    `tile` outputs (the last padded with zero weights); in each tile, block by block, the tile's
    scales (float16), for Q4_1 its offsets, then input by input the tile's codes: Q8_0 one signed
    byte per output; Q4_1 tile / 2 bytes, byte o holding output o's code in its low 4 bits and
    output o + tile / 2's in its high 4 bits."""
    outs, inputs = blocks.codes.shape
    tiles, count = -(-outs // tile), inputs // BLOCK
    padding = tiles * tile - outs

    def per_tile(t: torch.Tensor) -> torch.Tensor:  # [outs, ...] -> [tiles, count, ...] (outputs last)
        t = torch.cat([t, t.new_zeros(padding, *t.shape[1:])]) if padding else t
        return t.view(tiles, tile, count, -1).permute(0, 2, 3, 1)

    def half_bytes(t: torch.Tensor) -> torch.Tensor:
        return per_tile(t.unsqueeze(-1)).contiguous().view(torch.uint8).reshape(tiles, count, -1)

    codes = per_tile(blocks.codes.view(outs, count, BLOCK))  # [tiles, count, BLOCK inputs, tile outputs]
    if blocks.format == Q4_1:
        codes = codes[..., : tile // 2] | (codes[..., tile // 2 :] << 4)
        parts = [half_bytes(blocks.scale), half_bytes(blocks.offset)]
    else:
        parts = [half_bytes(blocks.scale)]
    parts.append(codes.contiguous().view(torch.uint8).reshape(tiles, count, -1))
    return torch.cat(parts, dim=-1).contiguous()
