"""TargetService: parse the request, verify it in the next batch on the worker, encode the answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.batcher import Batcher
from specdec.errors import InvalidArgument, ResourceExhausted
from specdec.runner import ModelRunner
from specdec.metrics import ServiceMetrics
from specdec.sampling import SamplingParams, tree_depths
from specdec.service_base import SessionHost
from specdec.serving import current_session
from specdec.session_store import log_id
from specdec.tensor_codec import encode_tensor
from specdec.v1 import common_pb2, target_pb2, target_pb2_grpc
from specdec.wire import ContextDelta, check_token_ids, context_from_pb, sampling_from_pb
from target_service.drafting import NextDrafts, NextRound, TargetDrafting
from target_service.verifier import Verification, VerifyJob, verify_batch


@dataclass(frozen=True)
class ParsedVerify:
    context: ContextDelta
    drafts: tuple[int, ...]
    params: SamplingParams
    feature_layers: tuple[int, ...] = ()
    feature_start: int = 0
    parents: tuple[int, ...] = ()
    next_round: NextRound | None = None


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, host: SessionHost, runner: ModelRunner, max_k: int, window_s: float, max_batch: int,
                 max_queued: int, metrics: ServiceMetrics, drafting: TargetDrafting | None = None):
        self.host = host
        self.runner = runner
        self.drafting = drafting  # a hosted drafter (--drafter): drafts the next round after a Verify
        self.max_k = max_k
        self.max_queued = max_queued
        self.metrics = metrics
        self.batcher: Batcher[ParsedVerify, Verification] = Batcher(
            host.worker, self._run_batch, key=lambda r: r.context.session_id,
            window_s=window_s, max_batch=max_batch, on_batch=metrics.verify_batch_size.observe,
        )

    def _parse(self, request: target_pb2.VerifyRequest) -> ParsedVerify:
        facts = self.host.facts
        ctx = context_from_pb(request.context, facts.vocab_size, facts.max_context)
        drafts = tuple(request.draft_tokens)
        if len(drafts) > self.max_k:
            raise InvalidArgument(f"at most {self.max_k} draft tokens per Verify, got {len(drafts)}")
        params = sampling_from_pb(request.sampling)
        parents = tuple(request.draft_parents)
        depth = self._tree_depth(parents, drafts, params) if parents else len(drafts)
        if ctx.committed_len + depth > facts.max_context:
            raise InvalidArgument(
                f"{ctx.committed_len} committed + {depth} draft tokens exceed the model's "
                f"context of {facts.max_context} tokens"
            )
        check_token_ids(drafts, facts.vocab_size, "draft_tokens")
        layers, start = (), 0
        if request.HasField("feature_start"):
            layers, start = tuple(request.feature_layers), request.feature_start
            depth = len(self.runner.layers)
            if not layers or len(layers) > 8 or not all(0 <= layer <= depth for layer in layers):
                raise InvalidArgument(f"feature_layers must name 1 to 8 layers in 0..{depth} (0 = the embeddings)")
            if start >= ctx.committed_len + len(drafts):
                raise InvalidArgument("feature_start must be a position this Verify computes or holds")
        next_round = self._next_round(request, params) if request.HasField("next_round") else None
        if next_round is not None and layers:
            raise InvalidArgument("with next_round the pass keeps its drafter's own features: ask for none "
                                  "(leave feature_start unset)")
        return ParsedVerify(ctx, drafts, params, layers, start, parents, next_round)

    def _next_round(self, request: target_pb2.VerifyRequest, params: SamplingParams) -> NextRound:
        if self.drafting is None:
            raise InvalidArgument("this target replica hosts no drafter (ModelInfo.drafter_kind is empty; start it with "
                                  "--drafter): leave next_round unset and propose through a draft tier")
        wanted = request.next_round
        if not 1 <= wanted.k <= self.max_k:
            raise InvalidArgument(f"next_round.k must be in [1, {self.max_k}], got {wanted.k}")
        if wanted.tree_nodes > self.max_k:
            raise InvalidArgument(f"next_round.tree_nodes must be at most {self.max_k}, got {wanted.tree_nodes}")
        if not 0.0 <= wanted.min_confidence <= 1.0:  # (NaN fails too)
            raise InvalidArgument(f"next_round.min_confidence must be in [0, 1], got {wanted.min_confidence}")
        if not params.greedy and not params.coupled:
            raise InvalidArgument("next_round drafts after the target's own verdict: greedy decoding or the coupled "
                                  "rule, not the rejection rule (whose verdict needs the coordinator's draws)")
        return NextRound(wanted.k, wanted.tree_nodes, wanted.min_confidence)

    @staticmethod
    def _tree_depth(parents: tuple[int, ...], drafts: tuple[int, ...], params: SamplingParams) -> int:
        """A tree of drafts checked: one parent per draft, each an earlier draft or -1; not with
        the rejection rule. Returns its depth."""
        if len(parents) != len(drafts):
            raise InvalidArgument(f"draft_parents has {len(parents)} entries for {len(drafts)} draft tokens")
        try:
            depths = tree_depths(parents)
        except ValueError as exc:
            raise InvalidArgument(f"draft_parents is not a tree: {exc}") from None
        if not params.greedy and not params.coupled:
            raise InvalidArgument("a tree of drafts is verified for greedy decoding and the coupled rule only")
        return max(depths)

    def _run_batch(self, requests: Sequence[ParsedVerify]) -> list[Verification | BaseException]:
        """On the worker thread: one forward pass for every request whose context resolves."""
        outcomes = self.host.run_batch(
            requests,
            self._job,
            lambda jobs: verify_batch(self.runner, jobs, self.drafting),
        )
        rows = sum(o.computed_tokens for o in outcomes if isinstance(o, Verification))
        for outcome in outcomes:
            if isinstance(outcome, Verification):
                outcome.batch_rows = rows
        return outcomes

    def _job(self, request: ParsedVerify, entry, tokens: list[int]) -> VerifyJob:
        """On the worker thread: a request's job; one that drafts the next round has the pass keep
        the features its drafter lacks."""
        layers, start = request.feature_layers, request.feature_start
        if request.next_round is not None:
            layers = self.drafting.layers
            start = self.drafting.feature_start(request.context.session_id, len(tokens))
        return VerifyJob(entry, tokens, request.drafts, request.params, layers, start, request.parents,
                         request.context.session_id, request.next_round)

    async def Verify(self, request: target_pb2.VerifyRequest, context) -> target_pb2.VerifyResponse:
        parsed = self._parse(request)
        current_session.set(log_id(parsed.context.session_id))
        if self.batcher.queued >= self.max_queued:
            self.metrics.rejected.inc()
            raise ResourceExhausted(
                f"{self.batcher.queued} Verify calls are already waiting on this target replica; "
                "retry later or add target replicas"
            )
        await self.host.restore_if_missing(parsed.context)
        timed = await self.batcher.submit(parsed)
        result = timed.value
        drafting_s = result.next_drafts.compute_s if result.next_drafts is not None else 0.0
        response = target_pb2.VerifyResponse(
            timings=common_pb2.Timings(queue_s=timed.queue_s, compute_s=timed.compute_s - drafting_s,
                                      batch_sessions=timed.batch_sessions, batch_rows=result.batch_rows),
            cache=common_pb2.CacheUse(reused_tokens=result.reused_tokens, computed_tokens=result.computed_tokens),
        )
        if result.features is not None and parsed.feature_layers:
            response.features.CopyFrom(encode_tensor(result.features))
        if result.next_drafts is not None:
            response.next_drafts.CopyFrom(_next_drafts_pb(result.next_drafts))
        if result.probs is not None:
            response.probs.CopyFrom(encode_tensor(result.probs))
        elif parsed.params.greedy:
            response.argmax_tokens.extend(result.tokens)
        else:
            response.sampled_tokens.extend(result.tokens)
        return response

    async def Release(self, request, context):
        if self.drafting is not None:
            session_id = request.session_id
            await self.host.worker.run(lambda: self.drafting.release(session_id))
        return await self.host.release(request, context)

    async def GetInfo(self, request, context):
        return await self.host.get_info(request, context)


def _next_drafts_pb(drafts: NextDrafts) -> target_pb2.NextDrafts:
    message = target_pb2.NextDrafts(follows=drafts.follows, tokens=drafts.tokens, parents=drafts.parents or (),
                                    compute_s=drafts.compute_s)
    if drafts.confidences is not None:
        message.confidences.CopyFrom(encode_tensor(torch.tensor(drafts.confidences, dtype=torch.float32)))
    return message
