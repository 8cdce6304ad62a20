"""Drafters: what proposes tokens. Plain classes, testable without a server.

Every drafter (n-gram, model, feature) implements the Drafter protocol: a batch of ProposeJobs
(the session's SessionCache, its full committed token list, k, sampling, and for a feature
drafter the target's features) in, one Proposal each out. Randomness for the draft draws is keyed
by (seed, position), so a retried request proposes the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from specdec.kv_cache import SessionCache
from specdec.ngram import ngram_lookup
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import DRAFT, SamplingParams, coupled_draws, probs_from_logits, sample, uniform


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None  # [len(tokens), V]; None when greedy, coupled or point mass
    point_mass: bool
    reused_tokens: int = 0
    computed_tokens: int = 0
    features_from: int | None = None  # a feature drafter lacking the target's features from here
    parents: list[int] | None = None  # a tree of drafts (ProposeResponse.parents); None: a chain
    # Per draft, the drafter's estimate that the target keeps it (its path's product of the head's
    # probabilities; 1.0 for a prompt-lookup copy); None where the drafter gives none.
    confidences: list[float] | None = None


@dataclass
class ProposeJob:
    """One Propose request: the session's cache entry, committed tokens, k and sampling, and the
    target's features of committed positions [features_start, ...) for a feature drafter."""

    entry: SessionCache
    committed: Sequence[int]
    k: int
    params: SamplingParams
    features: torch.Tensor | None = None
    features_start: int = 0
    provisional: Sequence[int] = ()  # uncommitted tokens after `committed` to draft after (draft-ahead)
    tree_nodes: int = 0  # a tree of up to this many drafts, at most k deep (drafters that can); else a chain
    # Drafts whose confidence (Proposal.confidences) falls below this are not proposed, nor
    # drafted on from (drafters that estimate it; 0: every draft up to k or tree_nodes).
    min_confidence: float = 0.0

    @property
    def sequence(self) -> list[int]:
        """What the drafts continue: the committed tokens, then the provisional ones."""
        return list(self.committed) + list(self.provisional)


class Drafter(Protocol):
    """What the draft service hosts."""

    kind: str  # "ngram", "model" or "eagle3", reported in ModelInfo and the stats
    runs_inline: bool  # cheap enough to run on the event loop, without batching

    def propose_batch(self, jobs: Sequence[ProposeJob]) -> list[Proposal]: ...


class ModelDrafter:
    """Autoregressive drafting with a causal LM: k single-token steps on a cached prefix, every
    session of a batch advancing together (one forward pass per step)."""

    kind = "model"
    runs_inline = False

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def propose_batch(self, jobs: Sequence[ProposeJob]) -> list[Proposal]:
        tokens = [job.sequence for job in jobs]
        drafted: list[list[int]] = [[] for _ in jobs]
        rows: list[list[torch.Tensor]] = [[] for _ in jobs]
        reused = [0] * len(jobs)
        computed = [0] * len(jobs)
        # Greedy drafts' confidences: the product of the model's probabilities of its choices so far.
        confidences: list[list[float] | None] = [[] if job.params.greedy and job.min_confidence > 0 else None
                                                 for job in jobs]
        ended = [False] * len(jobs)  # a chain that met a draft below its job's min_confidence
        for step in range(max((job.k for job in jobs), default=0)):
            active = [i for i, job in enumerate(jobs) if step < job.k and not ended[i]]
            if not active:
                break
            forwards = [ForwardJob(jobs[i].entry, tokens[i], len(tokens[i]) - 1) for i in active]
            for i, result in zip(active, self.runner.forward(forwards)):
                logits, kept = result.logits, result.reused
                position = len(tokens[i])
                if step == 0:
                    reused[i] = kept
                computed[i] += position - kept
                params = jobs[i].params
                if params.greedy:
                    token = int(torch.argmax(logits[-1]))
                    held = confidences[i]
                    if held is not None:
                        confidence = (held[-1] if held else 1.0) * float(torch.softmax(logits[-1].float(), -1)[token])
                        if confidence < jobs[i].min_confidence:
                            ended[i] = True
                            continue
                        held.append(confidence)
                elif params.coupled:  # the target's noise at this position: no q travels
                    token = coupled_draws(probs_from_logits(logits[-1:], params), params.seed, position)[0]
                else:
                    q = probs_from_logits(logits[-1], params)
                    token = sample(q, uniform(params.seed, position, DRAFT))
                    rows[i].append(q)
                drafted[i].append(token)
                tokens[i].append(token)
        return [
            Proposal(d, torch.stack(r) if r else None, point_mass=False, reused_tokens=u, computed_tokens=c,
                     confidences=f)
            for d, r, u, c, f in zip(drafted, rows, reused, computed, confidences)
        ]

    def propose(self, entry: SessionCache, committed: Sequence[int], k: int, params: SamplingParams) -> Proposal:
        return self.propose_batch([ProposeJob(entry, committed, k, params)])[0]



class NgramDrafter:
    """No model: proposes a continuation copied from the session's own tokens, as point masses."""

    kind = "ngram"
    # A lookup takes ~0.1 ms: cheaper to run on the event loop than to hand to a thread.
    runs_inline = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, entry: SessionCache, committed: Sequence[int], k: int, params: SamplingParams,
                provisional: Sequence[int] = ()) -> Proposal:
        reused = min(len(entry.tokens), len(committed))
        entry.tokens = list(committed)
        drafted = ngram_lookup(list(committed) + list(provisional), k, self.max_ngram, self.min_ngram)
        return Proposal(drafted, None, point_mass=True, reused_tokens=reused, computed_tokens=0)

    def propose_batch(self, jobs: Sequence[ProposeJob]) -> list[Proposal]:
        return [self.propose(job.entry, job.committed, job.k, job.params, job.provisional) for job in jobs]
