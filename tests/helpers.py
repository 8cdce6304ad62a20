"""Calling the coordinator the way a client does and collecting the stream."""

from __future__ import annotations

from dataclasses import dataclass

from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc


@dataclass
class Result:
    session_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: int
    stats: coordinator_pb2.GenerationStats
    messages: int


async def generate(channel, **fields) -> Result:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    tokens: list[int] = []
    text = []
    prompt_ids: list[int] = []
    last = None
    count = 0
    async for message in stub.Generate(coordinator_pb2.GenerateRequest(**fields)):
        if count == 0:
            prompt_ids = list(message.prompt_token_ids)
        count += 1
        tokens += message.token_ids
        text.append(message.text)
        last = message
    assert last is not None and last.HasField("stats"), "the stream must end with a message carrying stats"
    return Result(last.session_id, prompt_ids, tokens, "".join(text), last.finish_reason, last.stats, count)
