"""The Coordinator gRPC service: a thin adapter over the generation core (coordinator.core)."""

from __future__ import annotations

from coordinator.core import GenerationCore, GenerationRequest, Streamed
from coordinator.decoding import Stats
from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc
from specdec.wire import rule_from_pb

FINISH_REASONS = {
    "eos": coordinator_pb2.FINISH_REASON_EOS,
    "length": coordinator_pb2.FINISH_REASON_LENGTH,
    "stop": coordinator_pb2.FINISH_REASON_STOP,
    "context": coordinator_pb2.FINISH_REASON_CONTEXT,
}


def request_from_pb(request: coordinator_pb2.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        prompt=request.prompt, prompt_token_ids=list(request.prompt_token_ids), session_id=request.session_id,
        raw=request.raw, max_new_tokens=request.max_new_tokens, temperature=request.temperature,
        top_k=request.top_k, top_p=request.top_p if request.HasField("top_p") else None,
        seed=request.seed if request.HasField("seed") else None, k=request.k if request.HasField("k") else None,
        fixed_k=request.fixed_k, stop=list(request.stop), ignore_eos=request.ignore_eos, resume=request.resume,
        resume_from=request.resume_from, sampling_rule=rule_from_pb(request.sampling_rule),
    )


def stats_to_pb(stats: Stats) -> coordinator_pb2.GenerationStats:
    return coordinator_pb2.GenerationStats(**stats.as_dict())


def response_to_pb(streamed: Streamed) -> coordinator_pb2.GenerateResponse:
    chunk = streamed.chunk
    response = coordinator_pb2.GenerateResponse(session_id=streamed.session_id, text=chunk.text,
                                                token_ids=chunk.token_ids)
    if streamed.prompt_token_ids is not None:
        response.prompt_token_ids.extend(streamed.prompt_token_ids)
    if chunk.finish_reason:
        response.finish_reason = FINISH_REASONS[chunk.finish_reason]
    if chunk.stats is not None:
        response.stats.CopyFrom(stats_to_pb(chunk.stats))
    return response


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, core: GenerationCore):
        self.core = core
        self.watchers: list = []  # background health checks of the tiers (kept referenced)

    @property
    def decoder(self):
        return self.core.decoder

    async def Generate(self, request: coordinator_pb2.GenerateRequest, context):
        caller = self.core.caller(context.invocation_metadata())
        async for streamed in self.core.generate(request_from_pb(request), caller):
            yield response_to_pb(streamed)

    async def GetSession(self, request: coordinator_pb2.GetSessionRequest, context) -> coordinator_pb2.SessionInfo:
        session = await self.core.session(request.session_id, self.core.caller(context.invocation_metadata()))
        return coordinator_pb2.SessionInfo(session_id=session.session_id, token_ids=session.tokens,
                                           status=session.status, turns=session.turns, seed=session.seed)

    async def DeleteSession(self, request: coordinator_pb2.DeleteSessionRequest, context):
        caller = self.core.caller(context.invocation_metadata())
        released = await self.core.delete_session(request.session_id, caller)
        return coordinator_pb2.DeleteSessionResponse(released_replicas=released)
