"""The decoding loop: rounds of plan, propose, verify, decide, commit, stream (coordinator.rounds,
coordinator.planning).

Rounds overlap where they can without changing a token: round r's Redis commit and its stream
run beside round r+1's calls (tokens still reach the client only once committed), and with
draft-ahead the draft for round r+1 is proposed while round r is verified, on the hypothesis that
round r keeps all its drafts, and used only when it did. Plain asyncio code over the two tier
clients and the session store, so it can be read (and tested) without the servicer around it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Sequence

import grpc

from coordinator.clients import DeltaTracker, DraftClient, DraftResult, ReplicaSet, TargetClient
from coordinator.planning import KPlanner, Plan, RoundCosts, ceiling_for, sampling_regime
from coordinator.rounds import FeatureRelay, Round
from coordinator.text_stream import TextStream
from specdec.eagle import KIND as EAGLE_KIND
from specdec.metrics import ServiceMetrics
from specdec.prefix import CommittedTokens
from specdec.sampling import (ACCEPT, REJECTION, SAMPLE, SamplingParams, Verdict, greedy_accept, speculative_accept,
                              tree_accept, uniform)
from specdec.session_store import SessionRecord, SessionStore

log = logging.getLogger(__name__)

EOS, LENGTH, STOP, CONTEXT = "eos", "length", "stop", "context"
MAX_TREE_NODES = 32  # the tiers' largest Propose k and Verify drafts (their max_k defaults)
INTERRUPTED = "interrupted"  # the client went away: the turn is closed


@dataclass(frozen=True)
class TurnParams:
    """One Generate call's validated parameters."""

    max_new_tokens: int
    sampling: SamplingParams
    k: int  # the ceiling, or every round's k when fixed_k
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    fixed_k: bool = False
    logprobs: bool = False  # the chosen tokens' log-probabilities go with the chunks (rejection rule)

    @classmethod
    def from_dict(cls, stored: dict) -> "TurnParams":
        sampling = SamplingParams(stored["temperature"], stored["top_k"], stored["top_p"], stored["seed"],
                                  stored.get("sampling_rule", REJECTION))
        return cls(stored["max_new_tokens"], sampling, stored["k"], tuple(stored["stop"]), stored["ignore_eos"],
                   stored.get("fixed_k", True))

    def as_dict(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.sampling.temperature,
            "top_k": self.sampling.top_k,
            "top_p": self.sampling.top_p,
            "seed": self.sampling.seed,
            "sampling_rule": self.sampling.rule,
            "k": self.k,
            "fixed_k": self.fixed_k,
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
    k_per_round: list[int] = field(default_factory=list)
    draft_ahead_hits: int = 0
    draft_ahead_misses: int = 0

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
        return max(0.0, self.total_s - self.verify_s - self.redis_s)

    def record_round(self, planned_k: int, proposed: int, verdict: Verdict, depth: int | None = None) -> None:
        """A round's figures; a tree of `proposed` drafts counts its positions (depth) per position."""
        self.rounds += 1
        self.k_per_round.append(planned_k)
        self.draft_tokens += proposed
        self.accepted_tokens += verdict.accepted
        for i in range(proposed if depth is None else depth):
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
    logprobs: list[float] | None = None  # of token_ids under the target's p, when asked


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
        max_k: int = 16,
        draft_ahead: bool = False,
        tree_nodes: int = 0,
        tree_rule=tree_accept,
        tree_max_sessions: int = 1,
        confidence_floor: float | None = None,
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
        self.tree_rule = tree_rule  # the match rule over a tree of drafts
        self.tree_nodes = tree_nodes  # drafts per round as a tree (0: chains); greedy and coupled only
        self.tree_max_sessions = tree_max_sessions  # trees only while the target is this lightly loaded
        # Adaptive rounds ask the drafter to leave out drafts below a confidence: this one, or None
        # for each round's from the measured costs (KPlanner._floor); 0: never.
        self.confidence_floor = confidence_floor
        self.metrics = metrics or ServiceMetrics()
        self.max_k = max_k
        self.draft_ahead = draft_ahead and draft is not None
        self.costs = RoundCosts(max_k)

    @property
    def replica_sets(self) -> list[ReplicaSet]:
        """The target tier's replicas and, when there is one, the draft tier's."""
        return [self.target.replicas] + ([self.draft.replicas] if self.draft and self.draft.replicas else [])

    # --- a call -------------------------------------------------------------------------------

    def _stats(self, params: TurnParams) -> Stats:
        rule = "greedy" if params.sampling.greedy else params.sampling.rule
        drafter = "none" if self.draft is None else self.draft.kind + ("@target" if self.draft.in_target else "")
        return Stats(k=params.k, drafter=drafter, sampling_rule=rule)

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
        decode = self._decode(session, committed, [], params, text, stats, started)
        async for chunk in self._closing(session, stats, started, decode):
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

    # --- the rounds ---------------------------------------------------------------------------

    async def _decode(
        self, session: SessionRecord, committed: CommittedTokens, generated: list[int], params: TurnParams,
        text: TextStream, stats: Stats, started: float,
    ) -> AsyncIterator[Chunk]:
        tracker = DeltaTracker()
        # A turn that never drafts (k = 0, target only) asks the target for no features: a later
        # turn that drafts has the drafter catch up (at most its --max-catch-up positions).
        layers = self.draft.feature_layers if self.draft is not None and params.k > 0 else ()
        relay = FeatureRelay(layers) if layers else None
        regime = sampling_regime(params.sampling)
        floor = self.confidence_floor if self._cuts_drafts(params.sampling) else 0.0
        planner = KPlanner(self.max_k, self.costs, self.costs.acceptance(regime), confidence_floor=floor, regime=regime)
        # Drafts made in the target (--draft target): each Verify drafts the next round, planned
        # before it is sent; greedy and the coupled rule (the verdicts the target can reach itself).
        in_target = self.draft is not None and self.draft.in_target
        drafts_in_target = in_target and (params.sampling.greedy or params.sampling.coupled)
        pending: tuple[Plan, DraftResult] | None = None  # the last Verify's drafts for this round, and their plan
        previous: Round | None = None
        ahead: asyncio.Task | None = None  # round r+1's draft, proposed during round r's Verify
        while previous is None or previous.finish is None:
            room = self.limits.max_context - len(committed)
            if room <= 0:  # only reachable when the turn itself filled the context
                previous = self._empty_round(len(committed), text, generated, stats, session, started)
                break
            remaining = params.max_new_tokens - len(generated)
            # The plan is this round's, or in the target the next round's: after this one's token(s).
            later = 1 if in_target else 0
            ceiling = ceiling_for(params.k, remaining - later, room - later)
            trees = self._tree_nodes(ceiling, params.sampling)
            plan = Plan(ceiling, trees) if params.fixed_k else planner.plan(ceiling, trees)
            if in_target:
                now = _round_drafted_before(pending, len(committed), ceiling_for(params.k, remaining, room))
                asked = plan if drafts_in_target and plan.k > 0 else None
            else:
                now, asked = Round(len(committed), plan.k, plan.nodes, plan.min_confidence), None
            begun = time.perf_counter()
            # Propose (the draft-ahead's drafts when the previous round ended as it supposed), then
            # Verify and meanwhile the next round's draft-ahead. The previous round's stream runs
            # beside the drafting when the round drafts: the client, Redis and this loop then use
            # the cores while the drafter steps one row, not while the target verifies.
            calls_draft = not in_target and (now.k > 0 or ahead is not None)  # (k = 0: straight to Verify)
            stream_beside_draft = previous is not None and calls_draft and now.k > 0
            drafting = verifying = None
            if calls_draft:
                drafting = asyncio.create_task(self._draft(now, previous, ahead, session, committed, params, tracker,
                                                           stats, relay))
                drafting.add_done_callback(lambda _, now=now: setattr(now, "called_back_at", time.perf_counter()))
            try:
                if stream_beside_draft:
                    yield await self._streamed(previous, stats, started, beside=now)
                if drafting is not None:
                    now.draft = await drafting
                feature_start = relay.verify_start(len(committed)) if relay is not None else 0
                now.called_back_at = None
                verifying = asyncio.create_task(self.target.verify(
                    session.session_id, committed, now.drafts, params.sampling, tracker, self.limits.vocab_size,
                    layers, feature_start, now.parents, asked))
                verifying.add_done_callback(lambda _, now=now: setattr(now, "called_back_at", time.perf_counter()))
                ahead = self._propose_ahead(now, ceiling, session, committed, params, tracker, stats, relay)
                if previous is not None and not stream_beside_draft:
                    yield await self._streamed(previous, stats, started, beside=now)
                now.verification = await verifying
            except BaseException:
                for call in (drafting, verifying, ahead):
                    if call is not None:
                        call.cancel()
                raise
            self._decide(now, params, stats, generated, text)
            if relay is not None:
                relay.keep(now.verification.features, feature_start, len(committed) + len(now.new),
                           now.verdict.path if now.parents else None, len(committed))
            now.commit = asyncio.create_task(self._commit(now, session, stats, started))
            committed.extend(now.new)
            generated += now.new
            tree = now.parents is not None
            depth = now.counted_depth
            planner.observe(depth, now.verdict.accepted, tree)
            # The call's first round prefilled the turn: its time would make its k look costly.
            wall = time.perf_counter() - begun if previous is not None else None
            verified = now.verification
            made = verified.next_drafts  # (in the target) the next round's drafts, after the target's verdict
            pending = (asked, made) if made is not None and now.finish is None and made.follows == now.new else None
            stats.draft_s += made.compute_s if made is not None else 0.0
            if in_target and wall is not None:  # a round's drafting counts in the round it drafted for
                wall += (now.draft.compute_s if now.draft is not None else 0.0) - (made.compute_s if made else 0.0)
            confidences = (now.draft.confidences if now.draft is not None else None) or ()
            self.costs.observe(depth, wall, now.verdict.accepted, verified.batch_sessions,
                               verified.batch_rows, verified.compute_s, nodes=now.nodes if tree else 0,
                               drafts=len(now.drafts) if now.draft is not None else None, regime=regime,
                               confidences=confidences, kept=now.kept_drafts() if confidences else ())
            previous = now
        if ahead is not None:
            ahead.cancel()
        yield await self._streamed(previous, stats, started)

    async def _draft(self, now: Round, previous: Round | None, ahead: asyncio.Task | None, session: SessionRecord,
                     committed: CommittedTokens, params: TurnParams, tracker: DeltaTracker, stats: Stats,
                     relay: FeatureRelay | None) -> DraftResult | None:
        """This round's drafts: the previous round's draft-ahead if that round kept all its drafts
        and its next token is the draft-ahead's first guess, else a Propose now."""
        if ahead is not None:
            guessed = await self._ahead_result(ahead)
            if guessed is not None and previous.all_kept() and guessed.tokens[:1] == [previous.verdict.next_token] \
                    and len(guessed.tokens) > 1:
                stats.draft_ahead_hits += 1
                drafts = guessed.tokens[1 : 1 + now.k]
                probs = guessed.probs[1 : 1 + len(drafts)] if guessed.probs is not None else None
                return DraftResult(drafts, probs, guessed.point_mass, 0.0)
            stats.draft_ahead_misses += 1
        return await self._propose(session, committed, now.k, params.sampling, tracker, stats, relay,
                                   tree_nodes=now.nodes, min_confidence=now.min_confidence)

    def _cuts_drafts(self, sampling: SamplingParams) -> bool:
        """Whether the draft tier leaves out drafts under a confidence (ProposeRequest.min_confidence)
        for this sampling: feature drafters greedy and coupled, model drafters greedy. Elsewhere no
        floor is asked for, and rounds count by the drafts they got (an n-gram drafter that finds a
        shorter match, or none, drafted less than planned, not worse)."""
        kind = self.draft.kind if self.draft is not None else ""
        return (kind == EAGLE_KIND and (sampling.greedy or sampling.coupled)) or (kind == "model" and sampling.greedy)

    def _tree_nodes(self, k: int, sampling: SamplingParams) -> int:
        """Drafts a round of depth up to k may ask for as a tree (0: chains only): trees are
        verified for greedy decoding and the coupled rule, pay only when wider than a chain, and
        only while the target's passes carry few sessions (its spare compute is what a tree
        spends). With adaptive k the planner then chooses between the tree and chains (KPlanner)."""
        if self.tree_nodes <= k or not (sampling.greedy or sampling.coupled):
            return 0
        sessions, _ = self.costs.load()
        return self.tree_nodes if sessions <= self.tree_max_sessions else 0

    @staticmethod
    async def _ahead_result(ahead: asyncio.Task) -> DraftResult | None:
        if not ahead.done():
            ahead.cancel()  # its Verify came back first: not worth waiting for
        try:
            return await ahead
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - a draft-ahead is only a guess
            return None

    def _propose_ahead(self, now: Round, ceiling: int, session: SessionRecord, committed: CommittedTokens,
                       params: TurnParams, tracker: DeltaTracker, stats: Stats,
                       relay: FeatureRelay | None) -> asyncio.Task | None:
        """Draft-ahead: propose the next round now, after this round's drafts (provisional, never
        committed), one token more than a round drafts, since its first is a guess of this
        round's next token."""
        if not self.draft_ahead or ceiling <= 0 or now.parents:  # a tree is no sequence to draft after
            return None
        return asyncio.create_task(self._propose(session, committed, ceiling + 1, params.sampling, tracker, stats,
                                                 relay, provisional=now.drafts, quiet=True))

    async def _propose(
        self, session: SessionRecord, committed: CommittedTokens, k: int, params: SamplingParams,
        tracker: DeltaTracker, stats: Stats, relay: FeatureRelay | None, provisional: Sequence[int] = (),
        quiet: bool = False, tree_nodes: int = 0, min_confidence: float = 0.0,
    ) -> DraftResult | None:
        """Ask the draft tier; on any failure carry on target-only for this round."""
        if k <= 0 or self.draft is None:
            return None
        if self.draft.replicas is not None and not self.draft.replicas.any_healthy():
            # Every draft replica failed or fails its health check (dead or hung): do not wait on a
            # deadline each round; the health watch brings drafting back when one answers.
            return None if quiet else self._without_draft(stats)
        features, start = (relay.rows, relay.start) if relay is not None else (None, 0)
        try:
            result = await self.draft.propose(session.session_id, committed, k, params, tracker, features, start,
                                              provisional, tree_nodes, min_confidence)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - drafting failing must never fail the request
            reason = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
            log.warning("draft tier failed (%s); this round runs without a draft", reason)
            return None if quiet else self._without_draft(stats)
        stats.draft_s += result.compute_s
        if relay is not None and not quiet:  # a draft-ahead may be dropped: its delivery does not count
            relay.delivered(result.features_from)
        return result

    def _without_draft(self, stats: Stats) -> None:
        """A round that wanted a draft runs target-only: the stats and metrics say so."""
        stats.draft_fallback_rounds += 1
        self.metrics.draft_fallbacks.inc()

    def _decide(self, now: Round, params: TurnParams, stats: Stats, generated: list[int], text: TextStream) -> None:
        """The verdict on the drafts, the tokens the round commits and whether they end the turn."""
        verification, drafts = now.verification, now.drafts
        stats.verify_s += verification.compute_s
        if stats.rounds == 0:
            stats.target_reused_tokens = verification.reused_tokens
            stats.target_prefill_tokens = now.committed_len - verification.reused_tokens
        if verification.tokens is not None and now.parents:
            # A tree: follow the drafts that equal the target's own choice, from the root.
            now.verdict = self.tree_rule(drafts, now.parents, verification.tokens)
        elif verification.tokens is not None:
            # Greedy, or the coupled rule: keep drafts while they equal the target's own choice.
            now.verdict = self.match_rule(drafts, verification.tokens)
        else:
            seed, k = params.sampling.seed, len(drafts)
            draft = now.draft
            now.verdict = self.accept_rule(
                drafts, None if draft is None or draft.point_mass else draft.probs, verification.probs,
                [uniform(seed, now.committed_len + i, ACCEPT) for i in range(k)],
                [uniform(seed, now.committed_len + i, SAMPLE) for i in range(k + 1)],
            )
        stats.record_round(now.k, len(drafts), now.verdict, now.depth if now.parents else None)
        self.metrics.rounds.inc()
        self.metrics.draft_tokens.inc(len(drafts))
        self.metrics.accepted_tokens.inc(now.verdict.accepted)
        new = now.verdict.kept(drafts) + [now.verdict.next_token]
        now.new, now.finish = self._truncate(new, generated, params, text)
        if now.finish is None and now.committed_len + len(now.new) >= self.limits.max_context:
            now.finish = CONTEXT
        stats.generated_tokens += len(now.new)
        self.metrics.generated_tokens.inc(len(now.new))
        final = now.finish is not None
        logprobs = None
        if params.logprobs and verification.probs is not None:
            logprobs = [float(verification.probs[i, token].clamp_min(1e-45).log()) for i, token in enumerate(now.new)]
        now.chunk = Chunk(text.feed(generated + now.new, final=final), now.new, now.finish, stats if final else None,
                          logprobs)

    def _empty_round(self, committed_len: int, text: TextStream, generated: list[int], stats: Stats,
                     session: SessionRecord, started: float) -> Round:
        """The turn itself filled the context: a round that commits nothing and ends it."""
        last = Round(committed_len, 0, finish=CONTEXT)
        last.chunk = Chunk(text.feed(generated, final=True), [], CONTEXT, stats)
        last.commit = asyncio.create_task(self._commit(last, session, stats, started))
        return last

    async def _commit(self, now: Round, session: SessionRecord, stats: Stats, started: float) -> None:
        """Append the round to Redis; the last one with the finished turn's count and stats."""
        if now.finish is None:
            await self.store.commit(session.session_id, now.committed_len, now.new)
            return
        stats.total_s = time.perf_counter() - started
        await self.store.commit(session.session_id, now.committed_len, now.new, turns=session.turns + 1,
                                stats=stats.as_dict(), turn_open="0")

    async def _streamed(self, done: Round, stats: Stats, started: float, beside: Round | None = None) -> Chunk:
        """A round's chunk, once its commit is in Redis (a token is streamed only once committed).
        Waiting for the commit while the next round's call (its Propose or Verify) is still out
        costs nothing: redis_s counts only what the wait lasted beyond that call's return."""
        waited = time.perf_counter()
        await done.commit
        if beside is None:
            stats.redis_s += time.perf_counter() - waited
        elif beside.called_back_at is not None:
            stats.redis_s += max(0.0, time.perf_counter() - max(waited, beside.called_back_at))
        if done.finish is not None:
            stats.total_s = time.perf_counter() - started
        return done.chunk

    async def _timed_commit(self, timing: Stats, session_id: str, at: int, new: Sequence[int], **fields) -> None:
        started = time.perf_counter()
        await self.store.commit(session_id, at, new, **fields)
        timing.redis_s += time.perf_counter() - started

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


def _round_drafted_before(pending: tuple[Plan, DraftResult] | None, committed_len: int, ceiling: int) -> Round:
    """A round whose drafts the previous round's Verify made (in the target): the drafts it
    planned, when they still fit (a chain cut to the ceiling; a tree deeper than it dropped), else
    none (k = 0)."""
    if pending is None:
        return Round(committed_len, 0)
    plan, drafts = pending
    if drafts.depth > ceiling:
        if drafts.parents is not None or ceiling <= 0:
            return Round(committed_len, 0)
        drafts = replace(drafts, tokens=drafts.tokens[:ceiling],
                         confidences=drafts.confidences[:ceiling] if drafts.confidences is not None else None)
    now = Round(committed_len, min(plan.k, max(ceiling, 0)), plan.nodes, plan.min_confidence)
    now.draft = drafts
    return now
