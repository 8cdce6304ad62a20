"""The generation core: validate a request, find or create its session, run the decoder, and
yield what to stream. Plain values in and out: the gRPC servicer and the OpenAI-compatible HTTP
API are thin adapters over it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from coordinator.auth import check_owner
from coordinator.config import CoordinatorConfig
from coordinator.decoding import Chunk, Decoder, TurnParams
from coordinator.prompting import messages_tokens, turn_tokens
from specdec.access import KeyRing
from specdec.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from specdec.sampling import REJECTION, SamplingParams
from specdec.serving import current_session
from specdec.session_store import SessionRecord, log_id
from specdec.wire import check_session_id, check_token_ids

ROLES = ("system", "user", "assistant")


@dataclass
class GenerationRequest:
    """What a client asks for (GenerateRequest in coordinator.proto; the HTTP API fills it too)."""

    prompt: str = ""
    messages: Sequence[dict] = ()  # a whole chat (role, content), rendered by the chat template
    prompt_token_ids: Sequence[int] = ()
    session_id: str = ""
    raw: bool = False
    max_new_tokens: int = 0  # 0: the server's default
    temperature: float = 0.0
    top_k: int = 0
    top_p: float | None = None
    seed: int | None = None
    k: int | None = None
    fixed_k: bool = False
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    resume: bool = False
    resume_from: int = 0
    sampling_rule: str | None = None
    logprobs: bool = False  # the chosen tokens' log-probabilities (sampled with the rejection rule only)


@dataclass
class Streamed:
    """One message of a stream: the session it belongs to, and the chunk of tokens."""

    session_id: str
    chunk: Chunk
    prompt_token_ids: list[int] | None = None  # first message only


class GenerationCore:
    def __init__(self, decoder: Decoder, config: CoordinatorConfig, keys: KeyRing):
        self.decoder = decoder
        self.config = config
        self.keys = keys
        self.active = 0  # generations in flight on this replica
        # Tokenizing a long prompt takes a while: on a thread of its own, never on the event loop.
        # One thread, since a fast tokenizer must not be used by two threads at once.
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        # No token covers more characters than the longest vocabulary entry: a prompt longer
        # than context x that cannot fit, and is refused without tokenizing it.
        longest = max((len(t) for t in decoder.tokenizer.get_vocab()), default=1)
        self._max_fitting_chars = decoder.limits.max_context * max(1, longest)

    def caller(self, metadata) -> str:
        """The calling key's fingerprint ("" without keys); Unauthenticated without a valid key."""
        return self.keys.identify(metadata)

    # --- validation -------------------------------------------------------------------------

    def turn_params(self, request: GenerationRequest) -> TurnParams:
        """The request's knobs, checked (everything but the prompt and session)."""
        config = self.config
        k = config.default_k if request.k is None else request.k
        if not 0 <= k <= config.max_k:
            raise InvalidArgument(f"k must be in [0, {config.max_k}] (0 = target only), got {k}")
        max_new = request.max_new_tokens or config.default_max_new_tokens
        if not 0 < max_new <= config.max_new_tokens_limit:
            raise InvalidArgument(f"max_new_tokens must be at most {config.max_new_tokens_limit} (and positive), "
                                  f"got {max_new}")
        rule = request.sampling_rule or (REJECTION if request.logprobs else config.default_sampling_rule)
        sampling = SamplingParams(
            temperature=request.temperature, top_k=request.top_k,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=secrets.randbits(63) if request.seed is None else request.seed, rule=rule,
        ).validate()
        if request.logprobs and (sampling.greedy or sampling.rule != REJECTION):
            raise InvalidArgument("logprobs are returned for sampled requests (temperature > 0) with the rejection "
                                  "rule, whose rounds carry the target's distributions")
        if len(request.stop) > 16 or any(len(s) > 256 for s in request.stop):
            raise InvalidArgument("at most 16 stop strings of at most 256 characters each")
        return TurnParams(max_new, sampling, k, tuple(request.stop), request.ignore_eos, request.fixed_k,
                          request.logprobs)

    async def _tokenize(self, function, *args) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, function, *args)

    def _check_chars(self, text: str, what: str) -> None:
        limit = min(self.config.max_prompt_chars, self._max_fitting_chars)
        if len(text) > limit:
            raise InvalidArgument(f"{what} has {len(text)} characters; the limit is {limit} (the model's context is "
                                  f"{self.decoder.limits.max_context} tokens)")

    async def turn_tokens(self, request: GenerationRequest, history: list[int]) -> list[int]:
        """The token ids this turn appends, checked against the vocabulary and the context."""
        limits = self.decoder.limits
        given = sum(bool(x) for x in (request.prompt, request.prompt_token_ids, request.messages))
        if given > 1:
            raise InvalidArgument("send one of prompt, prompt_token_ids and messages")
        if request.prompt_token_ids:
            check_token_ids(request.prompt_token_ids, limits.vocab_size, "prompt_token_ids")
            tokens = list(request.prompt_token_ids)
        elif request.messages:
            if history:
                raise InvalidArgument("messages start a new session; continue a session with a prompt")
            for message in request.messages:
                if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                    raise InvalidArgument(f"each message needs a role ({', '.join(ROLES)}) and a text content")
            self._check_chars("".join(m["content"] for m in request.messages), "messages")
            tokens = await self._tokenize(messages_tokens, self.decoder.tokenizer, list(request.messages))
        else:
            if not request.prompt.strip():
                raise InvalidArgument("prompt is empty; send the text to continue or answer")
            self._check_chars(request.prompt, "prompt")
            tokens = await self._tokenize(turn_tokens, self.decoder.tokenizer, request.prompt, request.raw, history,
                                          limits.eos_token_ids)
        total = len(history) + len(tokens)
        if total >= limits.max_context:
            raise InvalidArgument(
                f"the prompt is {len(tokens)} tokens (session total {total}); the model's context is "
                f"{limits.max_context} tokens and at least one must be left to generate; shorten the prompt"
            )
        return tokens

    # --- calls ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest, caller: str) -> AsyncIterator[Streamed]:
        """Start or continue a session's turn (or resume an interrupted one) and stream it."""
        if request.session_id:
            current_session.set(log_id(check_session_id(request.session_id)))
        params = None if request.resume else self.turn_params(request)
        metrics = self.decoder.metrics
        if self.active >= self.config.max_active_sessions:
            metrics.rejected.inc()
            raise ResourceExhausted(
                f"this coordinator is serving its limit of {self.config.max_active_sessions} generations; "
                "retry later or use another coordinator replica"
            )
        self.active += 1
        metrics.active_sessions.inc()
        started = last = time.perf_counter()
        first_token = True
        try:
            stream = self._resume(request, caller) if request.resume else self._generate(request, params, caller)
            async for streamed in stream:
                current_session.set(log_id(streamed.session_id))
                if streamed.chunk.token_ids:
                    now = time.perf_counter()
                    if first_token:
                        metrics.time_to_first_token.observe(now - started)
                        first_token = False
                    else:
                        gap = (now - last) / len(streamed.chunk.token_ids)
                        for _ in streamed.chunk.token_ids:
                            metrics.inter_token_latency.observe(gap)
                    last = now
                yield streamed
        finally:
            self.active -= 1
            metrics.active_sessions.dec()

    async def _generate(self, request: GenerationRequest, params: TurnParams, caller: str) -> AsyncIterator[Streamed]:
        store = self.decoder.store
        if request.session_id:
            session = await store.load(request.session_id)  # NOT_FOUND before anything else
            check_owner(session, caller)
            tokens = None
        else:
            tokens = await self.turn_tokens(request, [])  # validate before creating anything
            session = await store.create(params.sampling.seed, owner=caller)
        async with store.lease(session.session_id):
            if tokens is None:
                session = await store.load(session.session_id)  # re-read under the lease
                tokens = await self.turn_tokens(request, session.tokens)
            first = True
            async for chunk in self.decoder.generate(session, tokens, params):
                yield Streamed(session.session_id, chunk, tokens if first else None)
                first = False

    async def _resume(self, request: GenerationRequest, caller: str) -> AsyncIterator[Streamed]:
        """Continue an unfinished turn from the last committed token (its coordinator died)."""
        if not request.session_id:
            raise InvalidArgument("resume needs the session_id of the interrupted generation")
        if request.prompt or request.prompt_token_ids or request.messages:
            raise InvalidArgument("resume continues the interrupted turn: send no prompt")
        store = self.decoder.store
        check_owner(await store.load(request.session_id), caller)
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
                yield Streamed(session.session_id, chunk)

    async def session(self, session_id: str, caller: str) -> SessionRecord:
        session = await self.decoder.store.load(check_session_id(session_id))
        check_owner(session, caller)
        return session

    async def delete_session(self, session_id: str, caller: str) -> int:
        """Delete a session everywhere; returns how many replicas freed a cache for it."""
        store = self.decoder.store
        check_owner(await store.load(check_session_id(session_id)), caller)
        async with store.lease(session_id):  # ABORTED while a Generate holds it
            await store.delete(session_id)
        return sum(await asyncio.gather(*(replicas.release_everywhere(session_id)
                                          for replicas in self.decoder.replica_sets)))
