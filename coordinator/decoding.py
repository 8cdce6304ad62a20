"""The decoding loop: draft, verify, accept/reject, commit to Redis, then stream.

Plain asyncio code over the two tier clients and the session store, so it can be read (and
tested) without the Coordinator servicer around it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import grpc
import torch

from coordinator.clients import DeltaTracker, DraftClient, DraftResult, ReplicaSet, TargetClient, VerifyResult
from coordinator.text_stream import TextStream
from specdec.metrics import ServiceMetrics
from specdec.prefix import CommittedTokens
from specdec.sampling import (ACCEPT, REJECTION, SAMPLE, SamplingParams, Verdict, greedy_accept, speculative_accept,
                              uniform)
from specdec.session_store import SessionRecord, SessionStore

log = logging.getLogger(__name__)

EOS, LENGTH, STOP, CONTEXT = "eos", "length", "stop", "context"
INTERRUPTED = "interrupted"  # the client went away: the turn is closed


@dataclass(frozen=True)
class TurnParams:
    """One Generate call's validated parameters."""

    max_new_tokens: int
    sampling: SamplingParams
    k: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @classmethod
    def from_dict(cls, stored: dict) -> "TurnParams":
        sampling = SamplingParams(stored["temperature"], stored["top_k"], stored["top_p"], stored["seed"],
                                  stored.get("sampling_rule", REJECTION))
        return cls(stored["max_new_tokens"], sampling, stored["k"], tuple(stored["stop"]), stored["ignore_eos"])

    def as_dict(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.sampling.temperature,
            "top_k": self.sampling.top_k,
            "top_p": self.sampling.top_p,
            "seed": self.sampling.seed,
            "sampling_rule": self.sampling.rule,
            "k": self.k,
            "stop": list(self.stop),
            "ignore_eos": self.ignore_eos,
        }


@dataclass
class Stats:
    """Figures for one call; mirrors GenerationStats in coordinator.proto."""

    k: int
    drafter: str
    sampling_rule: str = "greedy"
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    generated_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    proposed_per_position: list[int] = field(default_factory=list)
    target_prefill_tokens: int = 0
    target_reused_tokens: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    redis_s: float = 0.0
    total_s: float = 0.0
    draft_fallback_rounds: int = 0

    def __post_init__(self) -> None:
        self.accepted_per_position = [0] * self.k
        self.proposed_per_position = [0] * self.k

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.generated_tokens / self.rounds if self.rounds else 0.0

    @property
    def network_coordinator_s(self) -> float:
        return max(0.0, self.total_s - self.draft_s - self.verify_s - self.redis_s)

    def record_round(self, proposed: int, verdict: Verdict) -> None:
        self.rounds += 1
        self.draft_tokens += proposed
        self.accepted_tokens += verdict.accepted
        for i in range(proposed):
            self.proposed_per_position[i] += 1
            self.accepted_per_position[i] += i < verdict.accepted

    def as_dict(self) -> dict:
        return {
            **{name: getattr(self, name) for name in self.__dataclass_fields__},
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "network_coordinator_s": self.network_coordinator_s,
        }


@dataclass
class Chunk:
    """One streamed message: new text and ids; the last one has finish_reason and stats."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: Stats | None = None


@dataclass
class FeatureRelay:
    """The target's features of committed positions on their way from Verify to the feature
    drafter: those of positions [start, start + len(rows)) not yet delivered, and where the next
    Verify should start its features (a drafter that lacks some says from where)."""

    layers: tuple[int, ...]
    rows: torch.Tensor | None = None
    start: int = 0
    wanted_from: int | None = None

    def verify_start(self, committed_len: int) -> int:
        """Features from here on: what the drafter lacks, else the first position Verify computes."""
        start = committed_len - 1 if self.wanted_from is None else min(self.wanted_from, committed_len - 1)
        self.wanted_from = None
        return start

    def keep(self, features: torch.Tensor, start: int, committed_len: int) -> None:
        """After a round: keep the rows of positions now committed (all but the newest token's,
        which the target computes next round)."""
        rows = features[: max(0, committed_len - 1 - start)]
        if self.rows is not None and start == self.start + self.rows.shape[0]:
            self.rows = torch.cat([self.rows, rows])
        else:
            self.rows, self.start = rows, start

    def delivered(self, features_from: int | None) -> None:
        if features_from is None:
            self.rows = None  # the drafter holds them now
        else:
            self.wanted_from = features_from


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]


class Decoder:
    def __init__(
        self,
        target: TargetClient,
        draft: DraftClient | None,
        store: SessionStore,
        tokenizer,
        limits: ModelLimits,
        accept_rule=speculative_accept,
        metrics: ServiceMetrics | None = None,
        match_rule=greedy_accept,
    ):
        self.target = target
        self.draft = draft
        self.store = store
        self.tokenizer = tokenizer
        self.limits = limits
        # Injectable so tests can show that a wrong rule is caught: the rejection rule, and the rule
        # that keeps drafts while they equal the target's own choice (greedy and coupled).
        self.accept_rule = accept_rule
        self.match_rule = match_rule
        self.metrics = metrics or ServiceMetrics()

    async def _timed_commit(self, timing: Stats, session_id: str, at: int, new: Sequence[int], **fields) -> None:
        started = time.perf_counter()
        await self.store.commit(session_id, at, new, **fields)
        timing.redis_s += time.perf_counter() - started

    async def _propose(
        self, session: SessionRecord, committed: CommittedTokens, k: int, params: SamplingParams,
        tracker: DeltaTracker, stats: Stats, relay: FeatureRelay | None,
    ) -> DraftResult | None:
        """Ask the draft tier; on any failure carry on target-only for this round."""
        if k <= 0 or self.draft is None:
            return None
        if not self.draft.replicas.any_healthy():
            # Every draft replica failed or fails its health check (dead or hung): do not wait on a
            # deadline each round; the health watch brings drafting back when one answers.
            return self._without_draft(stats)
        features, start = (relay.rows, relay.start) if relay is not None else (None, 0)
        try:
            result = await self.draft.propose(session.session_id, committed, k, params, tracker, features, start)
        except Exception as exc:  # noqa: BLE001 - drafting failing must never fail the request
            reason = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
            log.warning("draft tier failed (%s); this round runs without a draft", reason)
            return self._without_draft(stats)
        stats.draft_s += result.compute_s
        if relay is not None:
            relay.delivered(result.features_from)
        return result

    def _without_draft(self, stats: Stats) -> None:
        """A round that wanted a draft runs target-only: the stats and metrics say so."""
        stats.draft_fallback_rounds += 1
        self.metrics.draft_fallbacks.inc()

    @property
    def replica_sets(self) -> list[ReplicaSet]:
        """The target tier's replicas and, when there is one, the draft tier's."""
        return [self.target.replicas] + ([self.draft.replicas] if self.draft else [])

    def _decide(self, draft: DraftResult | None, verification: VerifyResult, params: SamplingParams,
                position: int) -> Verdict:
        drafts = draft.tokens if draft else []
        if verification.tokens is not None:
            # Greedy, or the coupled rule: keep drafts while they equal the target's own choice.
            return self.match_rule(drafts, verification.tokens)
        seed = params.seed
        k = len(drafts)
        return self.accept_rule(
            drafts,
            None if draft is None or draft.point_mass else draft.probs,
            verification.probs,
            [uniform(seed, position + i, ACCEPT) for i in range(k)],
            [uniform(seed, position + i, SAMPLE) for i in range(k + 1)],
        )

    def _stats(self, params: TurnParams) -> Stats:
        rule = "greedy" if params.sampling.greedy else params.sampling.rule
        return Stats(k=params.k, drafter=self.draft.kind if self.draft else "none", sampling_rule=rule)

    async def generate(self, session: SessionRecord, turn: Sequence[int], params: TurnParams) -> AsyncIterator[Chunk]:
        """Append the turn's tokens to the session and stream the answer, round by round. The
        first chunk, empty, comes as soon as the turn is committed."""
        started = time.perf_counter()
        stats = self._stats(params)
        # The turn's prompt and parameters are committed before any token is generated, so a
        # resumed session knows what was asked and with which seed.
        await self._timed_commit(
            stats, session.session_id, len(session.tokens), turn, turn_open="1",
            seed=str(params.sampling.seed), params=params.as_dict(), turn_start=len(session.tokens),
            turn_prompt_len=len(turn),
        )
        yield Chunk("", [])
        text = TextStream(self.tokenizer, params.stop)
        committed = CommittedTokens(list(session.tokens) + list(turn))
        async for chunk in self._closing(session, stats, started, self._decode(session, committed, [], params, text, stats, started)):
            yield chunk

    async def resume(self, session: SessionRecord, resume_from: int) -> AsyncIterator[Chunk]:
        """Carry on the session's unfinished turn: first the committed output past the client's
        `resume_from` tokens, then new rounds with the turn's stored parameters."""
        started = time.perf_counter()
        params = TurnParams.from_dict(session.params)
        stats = self._stats(params)
        generated = session.tokens[session.turn_start + session.turn_prompt_len :]
        text = TextStream(self.tokenizer, params.stop)
        text.emitted = len(text.decode(generated[:resume_from]))
        yield Chunk(text.feed(generated, final=False), generated[resume_from:])
        committed = CommittedTokens(session.tokens)
        decode = self._decode(session, committed, list(generated), params, text, stats, started)
        async for chunk in self._closing(session, stats, started, decode):
            yield chunk

    async def _closing(self, session: SessionRecord, stats: Stats, started: float,
                       chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """Pass the chunks on; if the client goes away (its stream is cancelled), close the turn
        in Redis so nothing is left open. A turn that fails for want of a dependency stays open:
        the client can resume it (resume=true) once the dependency is back."""
        try:
            async for chunk in chunks:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            stats.total_s = time.perf_counter() - started
            await self._close_interrupted(session, stats)
            raise

    async def _close_interrupted(self, session: SessionRecord, stats: Stats) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.store.close_turn(
                session.session_id, turns=session.turns + 1, stats={**stats.as_dict(), "finish_reason": INTERRUPTED},
            )), timeout=2.0)
        except Exception as exc:  # noqa: BLE001 - best effort; the session's TTL still bounds it
            log.warning("could not close an interrupted turn (%s)", type(exc).__name__)

    async def _decode(
        self, session: SessionRecord, committed: CommittedTokens, generated: list[int], params: TurnParams,
        text: TextStream, stats: Stats, started: float,
    ) -> AsyncIterator[Chunk]:
        tracker = DeltaTracker()
        relay = FeatureRelay(self.draft.feature_layers) if self.draft is not None and self.draft.feature_layers else None
        finish: str | None = None
        while finish is None:
            remaining = params.max_new_tokens - len(generated)
            room = self.limits.max_context - len(committed)
            if room <= 0:  # only reachable when the turn itself filled the context
                new, finish = [], CONTEXT
                await self._commit_last(stats, session, len(committed), new, started)
                break
            # A round adds at most k+1 tokens and Verify needs committed + k within the context.
            k = max(0, min(params.k, remaining - 1, room - 1))
            draft = await self._propose(session, committed, k, params.sampling, tracker, stats, relay)
            drafts = draft.tokens if draft else []
            feature_start = relay.verify_start(len(committed)) if relay is not None else 0
            verification = await self.target.verify(
                session.session_id, committed, drafts, params.sampling, tracker, self.limits.vocab_size,
                relay.layers if relay is not None else (), feature_start,
            )
            stats.verify_s += verification.compute_s
            if stats.rounds == 0:
                stats.target_reused_tokens = verification.reused_tokens
                stats.target_prefill_tokens = len(committed) - verification.reused_tokens
            verdict = self._decide(draft, verification, params.sampling, len(committed))
            stats.record_round(len(drafts), verdict)
            self._count_round(len(drafts), verdict)
            new = list(drafts[: verdict.accepted]) + [verdict.next_token]
            new, finish = self._truncate(new, generated, params, text)
            if finish is None and len(committed) + len(new) >= self.limits.max_context:
                finish = CONTEXT
            stats.generated_tokens += len(new)
            if finish is None:
                await self._timed_commit(stats, session.session_id, len(committed), new)
            else:
                await self._commit_last(stats, session, len(committed), new, started)
            committed.extend(new)
            if relay is not None:
                relay.keep(verification.features, feature_start, len(committed))
            generated += new
            self.metrics.generated_tokens.inc(len(new))
            if finish is None:
                yield Chunk(text.feed(generated, final=False), new)
        yield Chunk(text.feed(generated, final=True), new, finish, stats)

    def _count_round(self, proposed: int, verdict: Verdict) -> None:
        self.metrics.rounds.inc()
        self.metrics.draft_tokens.inc(proposed)
        self.metrics.accepted_tokens.inc(verdict.accepted)

    async def _commit_last(
        self, stats: Stats, session: SessionRecord, committed_len: int, new: Sequence[int], started: float
    ) -> None:
        """Commit the final round together with the finished turn's count and stats."""
        stats.total_s = time.perf_counter() - started
        await self._timed_commit(
            stats, session.session_id, committed_len, new, turns=session.turns + 1, stats=stats.as_dict(), turn_open="0"
        )
        stats.total_s = time.perf_counter() - started

    def _truncate(
        self, new: list[int], generated: list[int], params: TurnParams, text: TextStream
    ) -> tuple[list[int], str | None]:
        """Cut a round's tokens at EOS, the token limit or a stop string; say which ended it."""
        finish = None
        remaining = params.max_new_tokens - len(generated)
        if len(new) >= remaining:
            new, finish = new[:remaining], LENGTH
        if not params.ignore_eos:
            for i, token in enumerate(new):
                if token in self.limits.eos_token_ids:
                    new, finish = new[: i + 1], EOS
                    break
        cut = text.stop_cut(generated + new, len(generated))
        if cut is not None:
            new, finish = new[: cut - len(generated)], STOP
        return new, finish
