"""Verification: one forward pass over committed + draft tokens gives p at k+1 positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ForwardResult, ModelRunner
from specdec.sampling import SamplingParams, coupled_draws, probs_from_logits, tree_depths
from target_service.drafting import DraftAfter, NextDrafts, NextRound, TargetDrafting, own_verdict


@dataclass
class Verification:
    """The target's answer: its own choice at the k+1 positions (argmax when greedy, its coupled
    draw under the coupled rule), or the distributions p (rejection rule). For a tree of N drafts:
    N + 1 choices, after the last committed token and after each draft."""

    tokens: list[int] | None  # k+1 ids
    probs: torch.Tensor | None  # [k+1, V]
    reused_tokens: int
    computed_tokens: int
    features: torch.Tensor | None = None  # float16 [positions from feature_start, layers * hidden]
    batch_rows: int = 0  # positions the forward pass computed for all its sessions
    next_drafts: NextDrafts | None = None  # the next round's, drafted in the target (VerifyJob.next_round)


@dataclass
class VerifyJob:
    """One Verify request: the session's cache entry, committed tokens, drafts and sampling."""

    entry: SessionCache
    committed: Sequence[int]
    draft_tokens: Sequence[int]
    params: SamplingParams
    feature_layers: tuple[int, ...] = ()
    feature_start: int = 0
    draft_parents: Sequence[int] = ()  # a tree of drafts (VerifyRequest.draft_parents); empty: a chain
    session_id: str = ""
    next_round: NextRound | None = None  # draft the next round after the pass (TargetDrafting)

    def forward_job(self) -> ForwardJob:
        # Logits at committed_len - 1 .. end: row i predicts position len(committed) + i (in a
        # tree, the token after draft i - 1).
        return ForwardJob(self.entry, list(self.committed) + list(self.draft_tokens), len(self.committed) - 1,
                          self.feature_layers, self.feature_start, tree=list(self.draft_parents) or None)

    def positions(self) -> list[int]:
        """The position each row's choice is made for (its coupling noise)."""
        after = len(self.committed)
        if not self.draft_parents:
            return list(range(after, after + len(self.draft_tokens) + 1))
        return [after] + [after + depth for depth in tree_depths(self.draft_parents)]


def _verification(job: VerifyJob, result: ForwardResult) -> Verification:
    logits, reused, features = result.logits, result.reused, result.features
    computed = len(job.committed) + len(job.draft_tokens) - reused
    if job.params.greedy:
        return Verification(torch.argmax(logits, dim=-1).tolist(), None, reused, computed, features)
    probs = probs_from_logits(logits, job.params)
    if job.params.coupled:
        return Verification(coupled_draws(probs, job.params.seed, len(job.committed), job.positions()), None,
                            reused, computed, features)
    return Verification(None, probs, reused, computed, features)


def verify_batch(runner: ModelRunner, jobs: Sequence[VerifyJob],
                 drafting: TargetDrafting | None = None) -> list[Verification]:
    """Score every job's drafts in one forward pass (k+1 distributions or argmax ids each). After
    a tree, each cache keeps the path the coordinator will keep: tree_accept over the target's own
    choices (greedy or coupled, the rules a tree is verified for), so that the next Verify
    computes none of its nodes again. Were the coordinator to keep another, that Verify's tokens
    would differ from the cached ones there and it would recompute from that point, as before.
    Then the jobs that ask for the next round's drafts get them (drafting, after that same
    verdict)."""
    forward_jobs = [job.forward_job() for job in jobs]
    verifications = [_verification(job, result) for job, result in zip(jobs, runner.forward(forward_jobs))]
    after: list[tuple[Verification, DraftAfter]] = []
    for job, forward_job, verification in zip(jobs, forward_jobs, verifications):
        if verification.tokens is None or not (job.draft_parents or job.next_round is not None):
            continue
        verdict = own_verdict(job.draft_tokens, job.draft_parents, verification.tokens)
        if job.draft_parents:
            runner.keep_path(forward_job, verdict.path)
        if job.next_round is not None and drafting is not None:
            new = verdict.kept(job.draft_tokens) + [verdict.next_token]
            after.append((verification, DraftAfter(job.session_id, list(job.committed) + new, new, job.params,
                                                   job.next_round, job.entry, job.feature_start)))
    if after:
        for (verification, _), drafts in zip(after, drafting.draft([one for _, one in after])):
            verification.next_drafts = drafts
    return verifications

