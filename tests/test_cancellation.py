"""A client that goes away stops its session's work on every service."""

from __future__ import annotations

import asyncio


from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc


def _value(metric) -> float:
    return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith("_total"))


async def test_cancelling_a_stream_stops_its_rounds_and_frees_the_session(stacks, channels):
    stack = stacks["model"]
    metrics = stack.decoder.metrics
    stub = coordinator_pb2_grpc.CoordinatorStub(channels["model"])
    call = stub.Generate(coordinator_pb2.GenerateRequest(prompt="keep talking", max_new_tokens=2000, ignore_eos=True, k=2))
    first = await call.read()
    call.cancel()
    await asyncio.sleep(0.3)  # the round in flight may finish
    settled = _value(metrics.rounds)
    await asyncio.sleep(0.5)
    assert _value(metrics.rounds) == settled, "rounds kept running after the client left"
    session = await stack.decoder.store.load(first.session_id)
    assert session.status == "idle"
    assert len(session.tokens) < len(first.prompt_token_ids) + 2000
    # The turn is closed, not left open for a day: it cannot be resumed, and its stats say why.
    assert not session.turn_open and session.turns == 1
    assert session.stats["finish_reason"] == "interrupted"
    more = await stub.GetSession(coordinator_pb2.GetSessionRequest(session_id=first.session_id))
    assert more.status == "idle"


async def test_the_first_message_names_the_session_before_any_token(channels):
    stub = coordinator_pb2_grpc.CoordinatorStub(channels["model"])
    call = stub.Generate(coordinator_pb2.GenerateRequest(prompt="who am i", max_new_tokens=5))
    first = await call.read()
    assert first.session_id and first.prompt_token_ids and not first.token_ids and not first.HasField("stats")
    call.cancel()
