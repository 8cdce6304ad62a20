"""Drafting in the target (`--drafter`): a feature drafter on the target's own model thread,
drafting the next round in the same job that verifies this one.

Across tiers a feature drafter's round costs a Propose call and the target's features a trip
through the coordinator. Here the drafter reads the features the pass just left in the session's
cache and drafts after the tokens the round commits if its verdict is the target's own (greedy:
drafts equal to its argmax; the coupled rule: to its draws): the verdict the coordinator reaches
with the same rule (coordinator.decoding). The drafts come back with the Verify reply, stamped with
the tokens they follow; a round that commits anything else has no use for them, and the output is
the target's either way. The head's per-session state (its KV cache, the features it took in)
lives in a table of its own beside the target's caches; a replica that lacks it (a new replica,
an eviction, a failover) takes the features in from the target's pass, at most the drafter's
max_catch_up positions back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from draft_service.drafters import ProposeJob
from draft_service.feature_drafter import FeatureDrafter
from specdec.kv_cache import SessionCache, SessionCacheTable
from specdec.sampling import SamplingParams, Verdict, greedy_accept, tree_accept


@dataclass(frozen=True)
class NextRound:
    """What to draft for the next round (VerifyRequest.next_round)."""

    k: int
    tree_nodes: int = 0
    min_confidence: float = 0.0


@dataclass
class NextDrafts:
    """The next round's drafts (VerifyResponse.next_drafts): they continue `follows`, the tokens the
    verified round commits under the target's own verdict."""

    follows: list[int]
    tokens: list[int]
    parents: list[int] | None
    confidences: list[float] | None
    compute_s: float = 0.0


@dataclass
class DraftAfter:
    """One verified session to draft after: its id, its committed tokens once the round commits
    `follows` under the target's own verdict (own_verdict), and what to draft."""

    session_id: str
    committed: Sequence[int]  # (ending with `follows`)
    follows: list[int]  # the kept drafts, then the target's next token
    params: SamplingParams
    next_round: NextRound
    target_entry: SessionCache  # the target's cache, whose features the pass left
    feature_start: int  # the first position the pass's features cover


def own_verdict(drafts: Sequence[int], parents: Sequence[int], choices: Sequence[int]) -> Verdict:
    """The verdict of the match rule on the target's own choices: the one the coordinator reaches
    for greedy decoding and the coupled rule (greedy_accept, tree_accept)."""
    return tree_accept(drafts, parents, choices) if parents else greedy_accept(drafts, choices)


class TargetDrafting:
    def __init__(self, drafter: FeatureDrafter, cache_bytes: int, max_context: int):
        self.drafter = drafter
        self.kind = drafter.kind
        self.layers = drafter.feature_layers
        self.max_context = max_context
        self.table = SessionCacheTable(max_bytes=cache_bytes)  # the head's per-session state

    def feature_start(self, session_id: str, committed_len: int) -> int:
        """The first position whose features a Verify after `committed_len` committed tokens must
        leave in the target's cache: what the head has not taken in (never more than its
        max_catch_up back), else the first position the pass computes."""
        entry = self.table.get_or_create(session_id)
        need = self.drafter.needs_features_from(entry.kv.length if entry.kv is not None else 0, committed_len)
        return max(0, min(need, committed_len - 1))

    def draft(self, after: Sequence[DraftAfter]) -> list[NextDrafts | None]:
        """On the model thread, after the pass: each session's next drafts, all drafted together
        (None where no room is left in the context)."""
        started = time.perf_counter()
        jobs, placed = [], []
        for i, one in enumerate(after):
            k = min(one.next_round.k, self.max_context - len(one.committed))
            if k < 1:
                continue
            end = len(one.committed) - 1  # the newest token's features come with the next pass
            features = one.target_entry.features.read(one.feature_start, end)
            jobs.append(ProposeJob(self.table.get_or_create(one.session_id), one.committed, k, one.params, features,
                                   one.feature_start, tree_nodes=one.next_round.tree_nodes,
                                   min_confidence=one.next_round.min_confidence))
            placed.append(i)
        answers: list[NextDrafts | None] = [None] * len(after)
        if jobs:
            proposals = self.drafter.propose_batch(jobs)
            spent = time.perf_counter() - started
            for i, proposal in zip(placed, proposals):
                answers[i] = NextDrafts(after[i].follows, proposal.tokens, proposal.parents, proposal.confidences,
                                        spent)
        self.table.enforce_bounds()
        return answers

    def release(self, session_id: str) -> bool:
        return self.table.release(session_id)
