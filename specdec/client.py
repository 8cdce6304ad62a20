"""A Python client for the coordinator's gRPC API, without torch: generate (streamed), resume an
interrupted turn, read and delete a session; plaintext, TLS or mutual TLS, with an API key.

    import asyncio
    from specdec.client import SpecdecClient

    async def main():
        async with SpecdecClient("127.0.0.1:50050") as client:
            async for piece in client.generate("Why is the sky blue?", max_new_tokens=64):
                print(piece.text, end="", flush=True)

    asyncio.run(main())
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from specdec.tls import channel_credentials, open_channel
from specdec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in coordinator_pb2.FinishReason.items()}
RULES = {"rejection": common_pb2.SAMPLING_RULE_REJECTION, "coupled": common_pb2.SAMPLING_RULE_COUPLED}


@dataclass
class Piece:
    """One streamed message: new text and token ids; the last one has finish_reason and stats."""

    session_id: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int] = field(default_factory=list)  # the first message only
    finish_reason: str = ""  # "eos", "length", "stop", "context" (last message)
    stats: dict | None = None


@dataclass
class Session:
    session_id: str
    token_ids: list[int]
    status: str
    turns: int
    seed: int


class SpecdecClient:
    """Talks to one coordinator. TLS: `ca` to trust (and `cert`/`key` for mutual TLS)."""

    def __init__(self, address: str, api_key: str | None = None, ca: str = "", cert: str = "", key: str = ""):
        self.address = address
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._channel = open_channel(address, channel_credentials(ca, cert, key))
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    async def __aenter__(self) -> "SpecdecClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str = "", *, session_id: str = "", prompt_token_ids=(), raw: bool = False,
                       max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float | None = None,
                       seed: int | None = None, k: int | None = None, fixed_k: bool = False, stop=(),
                       ignore_eos: bool = False, sampling_rule: str | None = None,
                       timeout: float | None = None) -> AsyncIterator[Piece]:
        """Start a session (or continue `session_id` with a new turn) and stream the answer."""
        request = coordinator_pb2.GenerateRequest(
            prompt=prompt, prompt_token_ids=list(prompt_token_ids), session_id=session_id, raw=raw,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, stop=list(stop),
            ignore_eos=ignore_eos, fixed_k=fixed_k)
        for name, value in (("top_p", top_p), ("seed", seed), ("k", k)):
            if value is not None:
                setattr(request, name, value)
        if sampling_rule:
            request.sampling_rule = RULES[sampling_rule]
        async for piece in self._stream(request, timeout):
            yield piece

    async def resume(self, session_id: str, resume_from: int, timeout: float | None = None) -> AsyncIterator[Piece]:
        """Carry on a turn whose coordinator died, after the `resume_from` tokens already received."""
        request = coordinator_pb2.GenerateRequest(session_id=session_id, resume=True, resume_from=resume_from)
        async for piece in self._stream(request, timeout):
            yield piece

    async def _stream(self, request, timeout) -> AsyncIterator[Piece]:
        async for message in self._stub.Generate(request, metadata=self.metadata, timeout=timeout):
            stats = None
            if message.HasField("stats"):
                from google.protobuf.json_format import MessageToDict

                stats = MessageToDict(message.stats, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)
            yield Piece(message.session_id, message.text, list(message.token_ids), list(message.prompt_token_ids),
                        FINISH_NAMES.get(message.finish_reason, "") if stats is not None else "", stats)

    async def get_session(self, session_id: str) -> Session:
        info = await self._stub.GetSession(coordinator_pb2.GetSessionRequest(session_id=session_id),
                                           metadata=self.metadata)
        return Session(info.session_id, list(info.token_ids), info.status, info.turns, info.seed)

    async def delete_session(self, session_id: str) -> int:
        """Delete the session everywhere; returns how many replicas freed a cache for it."""
        reply = await self._stub.DeleteSession(coordinator_pb2.DeleteSessionRequest(session_id=session_id),
                                               metadata=self.metadata)
        return reply.released_replicas


def is_rpc_error(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError)
