"""Coordinator.Generate: validate, find or create the session, run the decoder, stream."""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets

from coordinator.auth import api_keys, caller, check_owner
from coordinator.config import CoordinatorConfig
from coordinator.decoding import Chunk, Decoder, Stats, TurnParams
from coordinator.prompting import turn_tokens
from specdec.access import KeyRing
from specdec.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from specdec.sampling import SamplingParams
from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc
from specdec.wire import check_session_id, check_token_ids, rule_from_pb

FINISH_REASONS = {
    "eos": coordinator_pb2.FINISH_REASON_EOS,
    "length": coordinator_pb2.FINISH_REASON_LENGTH,
    "stop": coordinator_pb2.FINISH_REASON_STOP,
    "context": coordinator_pb2.FINISH_REASON_CONTEXT,
}


def turn_params(request: coordinator_pb2.GenerateRequest, config: CoordinatorConfig) -> TurnParams:
    """Validate a GenerateRequest's knobs (everything but the prompt and session)."""
    k = request.k if request.HasField("k") else config.default_k
    if not 0 <= k <= config.max_k:
        raise InvalidArgument(f"k must be in [0, {config.max_k}] (0 = target only), got {k}")
    max_new = request.max_new_tokens or config.default_max_new_tokens
    if max_new > config.max_new_tokens_limit:
        raise InvalidArgument(f"max_new_tokens must be at most {config.max_new_tokens_limit}, got {max_new}")
    seed = request.seed if request.HasField("seed") else secrets.randbits(63)
    sampling = SamplingParams(
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        seed=seed,
        rule=rule_from_pb(request.sampling_rule) or config.default_sampling_rule,
    ).validate()
    if len(request.stop) > 16 or any(len(s) > 256 for s in request.stop):
        raise InvalidArgument("at most 16 stop strings of at most 256 characters each")
    return TurnParams(max_new, sampling, k, tuple(request.stop), request.ignore_eos)


def stats_to_pb(stats: Stats) -> coordinator_pb2.GenerationStats:
    return coordinator_pb2.GenerationStats(**stats.as_dict())


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, decoder: Decoder, config: CoordinatorConfig, keys: KeyRing | None = None):
        self.decoder = decoder
        self.config = config
        self.keys = keys or api_keys(())
        self.active = 0  # Generate calls in flight on this replica
        self.watchers: list = []  # background health checks of the tiers (kept referenced)
        # Tokenizing a long prompt takes a while: on a thread of its own, never on the event loop.
        # One thread, since a fast tokenizer must not be used by two threads at once.
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        # No token covers more characters than the longest vocabulary entry: a prompt longer
        # than context x that cannot fit, and is refused without tokenizing it.
        longest = max((len(t) for t in decoder.tokenizer.get_vocab()), default=1)
        self._max_fitting_chars = decoder.limits.max_context * max(1, longest)

    async def _turn_tokens(self, request: coordinator_pb2.GenerateRequest, history: list[int]) -> list[int]:
        limits = self.decoder.limits
        if request.prompt_token_ids:
            if request.prompt:
                raise InvalidArgument("send either prompt or prompt_token_ids, not both")
            check_token_ids(request.prompt_token_ids, limits.vocab_size, "prompt_token_ids")
            tokens = list(request.prompt_token_ids)
        else:
            if not request.prompt.strip():
                raise InvalidArgument("prompt is empty; send the text to continue or answer")
            limit = min(self.config.max_prompt_chars, self._max_fitting_chars)
            if len(request.prompt) > limit:
                raise InvalidArgument(
                    f"prompt has {len(request.prompt)} characters; the limit is {limit} (the model's context is "
                    f"{limits.max_context} tokens)"
                )
            tokens = await asyncio.get_running_loop().run_in_executor(
                self._tokenizer_thread, turn_tokens, self.decoder.tokenizer, request.prompt, request.raw, history,
                limits.eos_token_ids)
        total = len(history) + len(tokens)
        if total >= limits.max_context:
            raise InvalidArgument(
                f"the prompt is {len(tokens)} tokens (session total {total}); the model's context is "
                f"{limits.max_context} tokens and at least one must be left to generate; shorten the prompt"
            )
        return tokens

    async def Generate(self, request: coordinator_pb2.GenerateRequest, context):
        caller_id = caller(self.keys, context)
        if request.session_id:
            check_session_id(request.session_id)
        params = None if request.resume else turn_params(request, self.config)
        metrics = self.decoder.metrics
        if self.active >= self.config.max_active_sessions:
            metrics.rejected.inc()
            raise ResourceExhausted(
                f"this coordinator is serving its limit of {self.config.max_active_sessions} generations; "
                "retry later or use another coordinator replica"
            )
        self.active += 1
        metrics.active_sessions.inc()
        try:
            async for response in self._generate(request, params, caller_id):
                yield response
        finally:
            self.active -= 1
            metrics.active_sessions.dec()

    async def _generate(self, request: coordinator_pb2.GenerateRequest, params: TurnParams | None, caller_id: str):
        store = self.decoder.store
        if request.resume:
            async for response in self._resume(request, caller_id):
                yield response
            return
        if request.session_id:
            session = await store.load(request.session_id)  # NOT_FOUND before anything else
            check_owner(session, caller_id)
            tokens = None
        else:
            tokens = await self._turn_tokens(request, [])  # validate before creating anything
            session = await store.create(params.sampling.seed, owner=caller_id)
        async with store.lease(session.session_id):
            if tokens is None:
                session = await store.load(session.session_id)  # re-read under the lease
                tokens = await self._turn_tokens(request, session.tokens)
            first = True
            async for chunk in self.decoder.generate(session, tokens, params):
                yield self._response(session.session_id, chunk, tokens if first else None)
                first = False

    async def _resume(self, request: coordinator_pb2.GenerateRequest, caller_id: str):
        """Continue an unfinished turn from the last committed token (its coordinator died)."""
        if not request.session_id:
            raise InvalidArgument("resume needs the session_id of the interrupted generation")
        if request.prompt or request.prompt_token_ids:
            raise InvalidArgument("resume continues the interrupted turn: send no prompt")
        store = self.decoder.store
        check_owner(await store.load(request.session_id), caller_id)
        async with store.lease(request.session_id):
            session = await store.load(request.session_id)
            if not session.turn_open or session.params is None:
                raise FailedPrecondition("the session has no interrupted turn to resume; send a new prompt instead")
            produced = len(session.tokens) - session.turn_start - session.turn_prompt_len
            if request.resume_from > produced:
                raise InvalidArgument(
                    f"resume_from={request.resume_from} but only {produced} tokens of the turn were committed"
                )
            async for chunk in self.decoder.resume(session, request.resume_from):
                yield self._response(session.session_id, chunk, None)

    @staticmethod
    def _response(session_id: str, chunk: Chunk, prompt_ids: list[int] | None) -> coordinator_pb2.GenerateResponse:
        response = coordinator_pb2.GenerateResponse(session_id=session_id, text=chunk.text, token_ids=chunk.token_ids)
        if prompt_ids is not None:
            response.prompt_token_ids.extend(prompt_ids)
        if chunk.finish_reason:
            response.finish_reason = FINISH_REASONS[chunk.finish_reason]
        if chunk.stats is not None:
            response.stats.CopyFrom(stats_to_pb(chunk.stats))
        return response

    async def GetSession(self, request: coordinator_pb2.GetSessionRequest, context) -> coordinator_pb2.SessionInfo:
        caller_id = caller(self.keys, context)
        session = await self.decoder.store.load(check_session_id(request.session_id))
        check_owner(session, caller_id)
        return coordinator_pb2.SessionInfo(
            session_id=session.session_id,
            token_ids=session.tokens,
            status=session.status,
            turns=session.turns,
            seed=session.seed,
        )

    async def DeleteSession(self, request: coordinator_pb2.DeleteSessionRequest, context):
        caller_id = caller(self.keys, context)
        store = self.decoder.store
        check_owner(await store.load(check_session_id(request.session_id)), caller_id)
        async with store.lease(request.session_id):  # ABORTED while a Generate holds it
            await store.delete(request.session_id)
        released = sum(await asyncio.gather(*(replicas.release_everywhere(request.session_id)
                                              for replicas in self.decoder.replica_sets)))
        return coordinator_pb2.DeleteSessionResponse(released_replicas=released)
