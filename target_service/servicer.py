"""TargetService: parse the request, verify on the worker thread, encode the answer."""

from __future__ import annotations

from specdec.errors import InvalidArgument
from specdec.kv_cache import CausalLMRunner
from specdec.service_base import SessionHost
from specdec.tensor_codec import encode_tensor
from specdec.v1 import common_pb2, target_pb2, target_pb2_grpc
from specdec.wire import check_token_ids, context_from_pb, sampling_from_pb
from target_service.verifier import verify


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, host: SessionHost, runner: CausalLMRunner, max_k: int):
        self.host = host
        self.runner = runner
        self.max_k = max_k

    async def Verify(self, request: target_pb2.VerifyRequest, context) -> target_pb2.VerifyResponse:
        facts = self.host.facts
        ctx = context_from_pb(request.context, facts.vocab_size, facts.max_context)
        drafts = list(request.draft_tokens)
        if len(drafts) > self.max_k:
            raise InvalidArgument(f"at most {self.max_k} draft tokens per Verify, got {len(drafts)}")
        if ctx.committed_len + len(drafts) > facts.max_context:
            raise InvalidArgument(
                f"{ctx.committed_len} committed + {len(drafts)} draft tokens exceed the model's "
                f"context of {facts.max_context} tokens"
            )
        check_token_ids(drafts, facts.vocab_size, "draft_tokens")
        params = sampling_from_pb(request.sampling)

        def work():
            entry, tokens = self.host.entry_and_tokens(ctx)
            result = verify(self.runner, entry, tokens, drafts, params)
            self.host.table.enforce_bounds(keep=ctx.session_id)
            return result

        timed = await self.host.worker.run(work)
        result = timed.value
        response = target_pb2.VerifyResponse(
            timings=common_pb2.Timings(queue_s=timed.queue_s, compute_s=timed.compute_s),
            cache=common_pb2.CacheUse(reused_tokens=result.reused_tokens, computed_tokens=result.computed_tokens),
        )
        if result.argmax is not None:
            response.argmax_tokens.extend(result.argmax)
        else:
            response.probs.CopyFrom(encode_tensor(result.probs))
        return response

    async def Release(self, request, context):
        return await self.host.release(request, context)

    async def GetInfo(self, request, context):
        return await self.host.get_info(request, context)
