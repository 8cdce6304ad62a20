"""Verification: one forward pass over committed + draft tokens gives p at k+1 positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.kv_cache import CausalLMRunner, SessionCache
from specdec.sampling import SamplingParams, probs_from_logits


@dataclass
class Verification:
    argmax: list[int] | None  # greedy: k+1 ids
    probs: torch.Tensor | None  # sampled: [k+1, V]
    reused_tokens: int
    computed_tokens: int


def verify(
    runner: CausalLMRunner,
    entry: SessionCache,
    committed: Sequence[int],
    draft_tokens: Sequence[int],
    params: SamplingParams,
) -> Verification:
    """Score `draft_tokens` after `committed`: row i of the result predicts position
    len(committed) + i, for i in 0..k (the last row is the bonus position)."""
    tokens = list(committed) + list(draft_tokens)
    logits, reused = runner.logits_from(entry, tokens, first=len(committed) - 1)
    computed = len(tokens) - reused
    if params.greedy:
        return Verification(torch.argmax(logits, dim=-1).tolist(), None, reused, computed)
    return Verification(None, probs_from_logits(logits, params), reused, computed)
