"""DraftService: parse the request, draft (in the next batch on the worker, or inline for the
cheap n-gram lookup), encode the answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from draft_service.drafters import Drafter, Proposal, ProposeJob
from specdec.batcher import Batcher
from specdec.errors import InvalidArgument, ResourceExhausted
from specdec.metrics import ServiceMetrics
from specdec.sampling import SamplingParams
from specdec.service_base import SessionHost
from specdec.session_store import log_id
from specdec.serving import current_session, run_inline
from specdec.tensor_codec import decode_tensor, encode_tensor
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from specdec.wire import ContextDelta, check_token_ids, context_from_pb, sampling_from_pb


@dataclass(frozen=True)
class ParsedPropose:
    context: ContextDelta
    k: int
    params: SamplingParams
    features: torch.Tensor | None = None
    features_start: int = 0
    provisional: tuple[int, ...] = ()
    tree_nodes: int = 0
    min_confidence: float = 0.0


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, host: SessionHost, drafter: Drafter, max_k: int, window_s: float, max_batch: int, max_queued: int,
                 metrics: ServiceMetrics):
        self.host = host
        self.drafter = drafter
        self.max_k = max_k
        self.max_queued = max_queued
        self.metrics = metrics
        self.batcher: Batcher[ParsedPropose, Proposal] = Batcher(
            host.worker, self._run_batch, key=lambda r: r.context.session_id,
            window_s=window_s, max_batch=max_batch, on_batch=metrics.draft_batch_size.observe,
        )

    def _parse(self, request: draft_pb2.ProposeRequest) -> ParsedPropose:
        facts = self.host.facts
        ctx = context_from_pb(request.context, facts.vocab_size, facts.max_context)
        if not 1 <= request.k <= self.max_k:
            raise InvalidArgument(f"k must be in [1, {self.max_k}], got {request.k}")
        provisional = tuple(request.provisional_tokens)
        if len(provisional) > self.max_k:
            raise InvalidArgument(f"at most {self.max_k} provisional tokens, got {len(provisional)}")
        check_token_ids(provisional, facts.vocab_size, "provisional_tokens")
        k = min(request.k, facts.max_context - ctx.committed_len - len(provisional))
        if k < 1:
            raise InvalidArgument("no room is left in the model's context to draft after these tokens")
        features = None
        if request.HasField("features"):
            if not facts.feature_layers:
                raise InvalidArgument("this drafter reads no target features; send none")
            features = decode_tensor(request.features)
            width = len(facts.feature_layers) * facts.feature_hidden_size
            if features.dim() != 2 or features.shape[1] != width:
                raise InvalidArgument(f"features must be [positions, {width}], got {tuple(features.shape)}")
            if request.features_start + features.shape[0] > ctx.committed_len:
                raise InvalidArgument("features may cover committed positions only")
        params = sampling_from_pb(request.sampling)
        tree_nodes = request.tree_nodes
        if tree_nodes > self.max_k:
            raise InvalidArgument(f"tree_nodes must be at most {self.max_k}, got {tree_nodes}")
        if tree_nodes > k and not params.greedy and not params.coupled:
            raise InvalidArgument("tree drafting needs greedy decoding or the coupled rule (the rejection rule "
                                  "verifies a chain)")
        if tree_nodes > k and provisional:
            raise InvalidArgument("tree drafting does not draft ahead: send no provisional_tokens with tree_nodes")
        if not 0.0 <= request.min_confidence <= 1.0:  # (NaN fails too)
            raise InvalidArgument(f"min_confidence must be in [0, 1], got {request.min_confidence}")
        return ParsedPropose(ctx, k, params, features, request.features_start, provisional, tree_nodes,
                             request.min_confidence)

    def _run_batch(self, requests: Sequence[ParsedPropose]) -> list[Proposal | BaseException]:
        """Every request whose context resolves drafts together (one forward per draft step)."""
        return self.host.run_batch(
            requests,
            lambda request, entry, tokens: ProposeJob(entry, tokens, request.k, request.params, request.features,
                                                      request.features_start, request.provisional,
                                                      request.tree_nodes, request.min_confidence),
            self.drafter.propose_batch,
        )

    async def Propose(self, request: draft_pb2.ProposeRequest, context) -> draft_pb2.ProposeResponse:
        parsed = self._parse(request)
        current_session.set(log_id(parsed.context.session_id))
        if self.drafter.runs_inline:
            timed = run_inline(lambda: self._unwrap(self._run_batch([parsed])[0]))
        else:
            if self.batcher.queued >= self.max_queued:
                self.metrics.rejected.inc()
                raise ResourceExhausted(f"{self.batcher.queued} Propose calls are already waiting on this draft replica")
            await self.host.restore_if_missing(parsed.context)
            timed = await self.batcher.submit(parsed)
        proposal = timed.value
        self.metrics.draft_tokens.inc(len(proposal.tokens))
        response = draft_pb2.ProposeResponse(
            tokens=proposal.tokens,
            point_mass=proposal.point_mass,
            timings=common_pb2.Timings(queue_s=timed.queue_s, compute_s=timed.compute_s,
                                      batch_sessions=timed.batch_sessions),
            cache=common_pb2.CacheUse(reused_tokens=proposal.reused_tokens, computed_tokens=proposal.computed_tokens),
        )
        if proposal.confidences is not None:
            response.confidences.CopyFrom(encode_tensor(torch.tensor(proposal.confidences, dtype=torch.float32)))
        if proposal.probs is not None:
            response.probs.CopyFrom(encode_tensor(proposal.probs))
        if proposal.features_from is not None:
            response.features_from = proposal.features_from
        if proposal.parents is not None:
            response.parents.extend(proposal.parents)
        return response

    @staticmethod
    def _unwrap(outcome: Proposal | BaseException) -> Proposal:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def Release(self, request, context):
        return await self.host.release(request, context)

    async def GetInfo(self, request, context):
        return await self.host.get_info(request, context)
