"""Drafting without a draft tier. The n-gram drafter inside the coordinator (`--draft
local-ngram`): prompt lookup needs only the session's tokens, which the coordinator holds, so it
needs no Propose call; the same drafts as the draft service's n-gram drafter, as point masses, and
DraftClient's `propose`, so the decoder treats both alike. And the drafter the target tier hosts
(`--draft target`): each round's drafts come back with the Verify before it (VerifyRequest.
next_round), so it proposes nothing itself.
"""

from __future__ import annotations

import time
from typing import Sequence

from coordinator.clients import DraftResult
from specdec.ngram import ngram_lookup
from specdec.prefix import CommittedTokens


class LocalNgramDraft:
    kind = "ngram"
    feature_layers: tuple[int, ...] = ()
    replicas = None  # no tier: nothing to watch, fail over or release
    in_target = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    async def propose(self, session_id: str, committed: CommittedTokens, k: int, params, tracker, features=None,
                      features_start: int = 0, provisional: Sequence[int] = (), tree_nodes: int = 0,
                      min_confidence: float = 0.0) -> DraftResult:
        started = time.perf_counter()
        drafted = ngram_lookup(committed.ids + list(provisional), k, self.max_ngram, self.min_ngram)
        return DraftResult(drafted, None, point_mass=True, compute_s=time.perf_counter() - started)


class TargetDrafts:
    """`--draft target`: the target replicas host a drafter (ModelInfo.drafter_kind) that drafts
    each next round in the Verify of this one (coordinator.decoding asks with next_round)."""

    feature_layers: tuple[int, ...] = ()  # the target keeps its drafter's features: none are relayed
    replicas = None  # the target tier's replicas are the drafter's
    in_target = True

    def __init__(self, kind: str):
        self.kind = kind
