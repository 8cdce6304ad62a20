"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions and /v1/completions, whole
responses or server-sent events, on the coordinator beside its gRPC port. A thin adapter over the
generation core (coordinator.core), like the gRPC servicer: the same validation, sessions,
API keys (`Authorization: Bearer`), and tokens.

Per-request speculation figures ride along in each response under "spec_decode", named as vLLM
names its speculative-decoding metrics (num_drafts, num_draft_tokens, num_accepted_tokens,
num_accepted_tokens_per_pos), with the acceptance rate and mean acceptance length.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import grpc
from aiohttp import web

from coordinator.core import GenerationCore, GenerationRequest, Streamed
from coordinator.decoding import Stats
from specdec.errors import InvalidArgument, NotFound, SpecdecError, status_for

log = logging.getLogger(__name__)

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
MAX_BODY = 8 * 1024**2


def error_body(exc: BaseException) -> tuple[int, dict]:
    """An error's HTTP status and OpenAI-shaped body."""
    code, message = status_for(exc)
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    if status == 500:
        log.error("HTTP request failed", exc_info=exc)
    return status, {"error": {"message": message[:1000], "type": kind, "param": None,
                              "code": getattr(exc, "openai_code", None)}}


def error_response(exc: BaseException) -> web.Response:
    status, body = error_body(exc)
    return web.json_response(body, status=status)


def spec_decode(stats: Stats | None) -> dict | None:
    if stats is None:
        return None
    return {
        "num_drafts": sum(1 for k in stats.k_per_round if k),
        "num_draft_tokens": stats.draft_tokens,
        "num_accepted_tokens": stats.accepted_tokens,
        "num_accepted_tokens_per_pos": list(stats.accepted_per_position),
        "draft_acceptance_rate": stats.acceptance_rate,
        "mean_acceptance_length": stats.mean_accepted_length,
        "drafter": stats.drafter,
        "sampling_rule": stats.sampling_rule,
    }


class UnknownModel(NotFound):
    openai_code = "model_not_found"


class OpenAIServer:
    def __init__(self, core: GenerationCore, model_name: str):
        self.core = core
        self.model_name = model_name
        self.created = int(time.time())
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        self.app.add_routes([
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
        ])
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # the port chosen when 0 was asked for
        return f"{host}:{bound}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - every error an OpenAI-shaped answer
            return error_response(exc)

    # --- endpoints ----------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        self._caller(request)
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "specdec"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        caller, body = self._caller(request), await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidArgument("messages must be a non-empty list of {role, content}")
        generation = self._generation(body, messages=[_message(m) for m in messages],
                                      max_tokens=body.get("max_completion_tokens", body.get("max_tokens")),
                                      logprobs=bool(body.get("logprobs")))
        return await self._respond(request, body, generation, caller, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        caller, body = self._caller(request), await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            generation = self._generation(body, prompt_token_ids=prompt, max_tokens=body.get("max_tokens", 16),
                                          logprobs=body.get("logprobs") is not None)
        elif isinstance(prompt, str):
            generation = self._generation(body, prompt=prompt, raw=True, max_tokens=body.get("max_tokens", 16),
                                          logprobs=body.get("logprobs") is not None)
        else:
            raise InvalidArgument("prompt must be a string, a list with one string, or a list of token ids")
        return await self._respond(request, body, generation, caller, chat=False)

    # --- helpers ------------------------------------------------------------------------------

    def _caller(self, request: web.Request) -> str:
        return self.core.caller([("authorization", request.headers.get("Authorization", ""))])

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        model = body.get("model")
        if model not in (None, self.model_name):
            raise UnknownModel(f"the model {str(model)[:100]!r} does not exist here; GET /v1/models lists "
                               f"{self.model_name!r}")
        if body.get("n", 1) != 1:
            raise InvalidArgument("only n=1 is supported")
        return body

    def _generation(self, body: dict, max_tokens=None, **fields: Any) -> GenerationRequest:
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidArgument("stop must be a string or a list of strings")
        numbers = {name: body.get(name) for name in ("temperature", "top_p", "seed", "top_k")}
        for name, value in numbers.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InvalidArgument(f"{name} must be a number")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise InvalidArgument("max_tokens must be an integer")
        seed = numbers["seed"]
        return GenerationRequest(
            max_new_tokens=max_tokens or 0,
            temperature=1.0 if numbers["temperature"] is None else float(numbers["temperature"]),
            top_p=None if numbers["top_p"] is None else float(numbers["top_p"]),
            top_k=int(numbers["top_k"] or 0), seed=None if seed is None else int(seed) % 2**64, stop=stop, **fields,
        )

    async def _respond(self, request: web.Request, body: dict, generation: GenerationRequest, caller: str,
                       chat: bool) -> web.StreamResponse:
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        stream = self.core.generate(generation, caller)
        first = await anext(stream)  # errors before any byte is sent become OpenAI-shaped statuses
        if body.get("stream"):
            return await self._sse(request, body, ident, first, stream, chat)
        text, tokens, logprobs, last = [], [], [], first
        async for streamed in _chain(first, stream):
            text.append(streamed.chunk.text)
            tokens += streamed.chunk.token_ids
            logprobs += streamed.chunk.logprobs or []
            last = streamed
        finish = FINISH.get(last.chunk.finish_reason or "", "stop")
        choice: dict = {"index": 0, "finish_reason": finish,
                        "logprobs": self._logprobs(tokens, logprobs, chat) if generation.logprobs else None}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return web.json_response({
            "id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": [choice], "usage": _usage(first, tokens),
            "spec_decode": spec_decode(last.chunk.stats), "session_id": first.session_id,
        })

    async def _sse(self, request: web.Request, body: dict, ident: str, first: Streamed, stream, chat: bool):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(payload: dict) -> None:
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        def event(text: str, finish: str | None, streamed: Streamed, role: bool = False) -> dict:
            choice: dict = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["delta"] = ({"role": "assistant"} if role else {}) | ({"content": text} if text or role else {})
            else:
                choice["text"] = text
            return {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [choice],
                    "session_id": streamed.session_id}

        tokens: list[int] = []
        await send(event("", None, first, role=True))
        try:
            async for streamed in _chain(first, stream):
                chunk = streamed.chunk
                tokens += chunk.token_ids
                finish = FINISH.get(chunk.finish_reason or "") if chunk.finish_reason else None
                if chunk.text or finish:
                    payload = event(chunk.text, finish, streamed)
                    if finish:
                        payload["spec_decode"] = spec_decode(chunk.stats)
                    await send(payload)
            if (body.get("stream_options") or {}).get("include_usage"):
                await send({"id": ident, "object": kind, "created": created, "model": self.model_name,
                            "choices": [], "usage": _usage(first, tokens)})
        except SpecdecError as exc:  # after the headers: an error event, as OpenAI's API sends them
            await send(error_body(exc)[1])
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _logprobs(self, tokens: list[int], logprobs: list[float], chat: bool) -> dict:
        decode = self.core.decoder.tokenizer.decode
        if chat:
            return {"content": [{"token": decode([t]), "logprob": lp, "bytes": list(decode([t]).encode()),
                                 "top_logprobs": []} for t, lp in zip(tokens, logprobs)]}
        return {"tokens": [decode([t]) for t in tokens], "token_logprobs": logprobs}


def _message(raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise InvalidArgument("each message must be an object with role and content")
    content = raw.get("content")
    if isinstance(content, list):  # OpenAI's content parts: keep the text ones
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return {"role": raw.get("role"), "content": content}


def _usage(first: Streamed, tokens: list[int]) -> dict:
    prompt = len(first.prompt_token_ids or [])
    return {"prompt_tokens": prompt, "completion_tokens": len(tokens), "total_tokens": prompt + len(tokens)}


async def _chain(first: Streamed, rest):
    yield first
    async for streamed in rest:
        yield streamed
