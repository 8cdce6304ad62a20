"""Drafters: what proposes tokens. Plain classes, testable without a server.

Both take the session's SessionCache and the full committed token list and return a Proposal.
Randomness for the draft draws is keyed by (seed, position, DRAFT), so a retried request
proposes the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from specdec.kv_cache import CausalLMRunner, SessionCache
from specdec.sampling import DRAFT, SamplingParams, probs_from_logits, sample, uniform


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None  # [len(tokens), V]; None when greedy or point mass
    point_mass: bool
    reused_tokens: int = 0
    computed_tokens: int = 0


class ModelDrafter:
    """Autoregressive drafting with a causal LM: k single-token steps on a cached prefix."""

    kind = "model"
    runs_inline = False

    def __init__(self, runner: CausalLMRunner):
        self.runner = runner

    def propose(self, entry: SessionCache, committed: Sequence[int], k: int, params: SamplingParams) -> Proposal:
        tokens = list(committed)
        drafted: list[int] = []
        rows: list[torch.Tensor] = []
        reused = computed = 0
        for step in range(k):
            before = len(tokens)
            logits, kept = self.runner.logits_from(entry, tokens, first=before - 1)
            if step == 0:
                reused, computed = kept, before - kept
            else:
                computed += before - kept
            row = logits[-1]
            if params.greedy:
                token = int(torch.argmax(row))
            else:
                q = probs_from_logits(row, params)
                token = sample(q, uniform(params.seed, before, DRAFT))
                rows.append(q)
            drafted.append(token)
            tokens.append(token)
        probs = torch.stack(rows) if rows else None
        return Proposal(drafted, probs, point_mass=False, reused_tokens=reused, computed_tokens=computed)


def ngram_lookup(tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (longest n first) and propose the up to k tokens that followed it."""
    seq = np.asarray(tokens, dtype=np.int64)
    length = len(seq)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        if n <= 0:
            break
        suffix = seq[length - n :]
        # Windows starting at 0..length-n-1 (the suffix itself excluded).
        windows = np.lib.stride_tricks.sliding_window_view(seq[: length - 1], n)
        matches = np.flatnonzero((windows == suffix).all(axis=1))
        if len(matches):
            start = int(matches[-1]) + n
            return seq[start : start + k].tolist()
    return []


class NgramDrafter:
    """No model: proposes a continuation copied from the session's own tokens, as point masses."""

    kind = "ngram"
    # A lookup takes ~0.1 ms: cheaper to run on the event loop than to hand to a thread.
    runs_inline = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, entry: SessionCache, committed: Sequence[int], k: int, params: SamplingParams) -> Proposal:
        reused = min(len(entry.tokens), len(committed))
        entry.tokens = list(committed)
        drafted = ngram_lookup(committed, k, self.max_ngram, self.min_ngram)
        return Proposal(drafted, None, point_mass=True, reused_tokens=reused, computed_tokens=0)
