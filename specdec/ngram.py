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
    """Find the latest earlier occurrence of the sequence's last n tokens (longest n first, n at
    most max_ngram and at least min_ngram) and propose the up to k tokens that followed it."""
    seq = np.asarray(tokens, dtype=np.int64)
    length = len(seq)
    longest = min(max_ngram, length - 1)
    if longest < max(min_ngram, 1):
        return []
    # Earlier occurrences end where the last token recurs; each is extended backwards one token at
    # a time (a few vector operations over those ends, not one pass over the sequence per n).
    ends = np.flatnonzero(seq[: length - 1] == seq[length - 1])
    matched = np.ones(len(ends), dtype=np.int64)
    still = np.ones(len(ends), dtype=bool)
    for back in range(1, longest):
        earlier = ends - back
        still &= earlier >= 0
        still[still] &= seq[earlier[still]] == seq[length - 1 - back]
        matched += still
    best = int(matched.max(initial=0))
    if best < max(min_ngram, 1):
        return []
    start = int(ends[np.flatnonzero(matched == best)[-1]]) + 1
    return seq[start : start + k].tolist()
