"""DraftService: parse the request, run the drafter on the worker thread, encode the answer."""

from __future__ import annotations

from specdec.errors import InvalidArgument
from specdec.service_base import SessionHost
from specdec.serving import run_inline
from specdec.tensor_codec import encode_tensor
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from specdec.wire import context_from_pb, sampling_from_pb


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, host: SessionHost, drafter, max_k: int):
        self.host = host
        self.drafter = drafter
        self.max_k = max_k

    async def Propose(self, request: draft_pb2.ProposeRequest, context) -> draft_pb2.ProposeResponse:
        facts = self.host.facts
        ctx = context_from_pb(request.context, facts.vocab_size, facts.max_context)
        if not 1 <= request.k <= self.max_k:
            raise InvalidArgument(f"k must be in [1, {self.max_k}], got {request.k}")
        params = sampling_from_pb(request.sampling)
        k = min(request.k, facts.max_context - ctx.committed_len)

        def work():
            entry, tokens = self.host.entry_and_tokens(ctx)
            proposal = self.drafter.propose(entry, tokens, k, params) if k > 0 else None
            self.host.table.enforce_bounds(keep=ctx.session_id)
            return proposal

        timed = run_inline(work) if self.drafter.runs_inline else await self.host.worker.run(work)
        proposal = timed.value
        response = draft_pb2.ProposeResponse(
            timings=common_pb2.Timings(queue_s=timed.queue_s, compute_s=timed.compute_s),
        )
        if proposal is not None:
            response.tokens.extend(proposal.tokens)
            response.point_mass = proposal.point_mass
            response.cache.reused_tokens = proposal.reused_tokens
            response.cache.computed_tokens = proposal.computed_tokens
            if proposal.probs is not None:
                response.probs.CopyFrom(encode_tensor(proposal.probs))
        return response

    async def Release(self, request, context):
        return await self.host.release(request, context)

    async def GetInfo(self, request, context):
        return await self.host.get_info(request, context)
