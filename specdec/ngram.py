"""Prompt lookup (n-gram drafting): the continuation of the latest earlier occurrence of a
sequence's last n tokens. Shared by the draft service's n-gram drafter, the hybrid feature
drafter and the coordinator's in-process n-gram drafter."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# The coordinator's --draft for prompt lookup inside itself, without a draft tier.
LOCAL_NGRAM = "local-ngram"

# The feature drafter's hybrid (--hybrid-ngram): the shortest repeated suffix whose continuation it
# takes. Offline on Spec-Bench answers (make bench-tree-shapes) 1 and 2 keep as many tokens per
# step, but at 1 the copy leads a tree the target then leaves 41% of the time (22% at 2), and a
# tree's leading branch is what the target's cache keeps.
HYBRID_MIN_NGRAM = 2


def ngram_lookup(tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Find the latest earlier occurrence of the sequence's last n tokens (longest n first) and
    propose the up to k tokens that followed it."""
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
