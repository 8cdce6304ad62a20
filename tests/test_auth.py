"""API keys on the coordinator: no key, a wrong key, another key's session."""

from __future__ import annotations

import grpc
import pytest
import pytest_asyncio

from conftest import start_stack
from specdec.access import fingerprint
from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc


@pytest_asyncio.fixture(scope="module")
async def guarded(redis_server, tiny_target, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text("# team b\nkey-bob\n")
    stack = await start_stack(redis_server.url, tiny_target, "ngram", api_keys=("key-alice",),
                              api_keys_file=str(key_file))
    yield stack
    for server in stack.servers:
        await server.stop(0)


async def _generate(channel, key: str | None, **fields) -> list:
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    return [m async for m in stub.Generate(coordinator_pb2.GenerateRequest(max_new_tokens=4, **fields), metadata=metadata)]


@pytest.mark.parametrize("key,message", [(None, "needs an API key"), ("key-mallory", "not valid")])
async def test_calls_without_a_valid_key_are_unauthenticated(guarded, key, message):
    async with grpc.aio.insecure_channel(guarded.coordinator) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await _generate(channel, key, prompt="hi")
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in failure.value.details()
    assert "key-mallory" not in failure.value.details()


async def test_a_session_is_read_and_continued_only_with_the_key_that_created_it(guarded):
    async with grpc.aio.insecure_channel(guarded.coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        first = await _generate(channel, "key-alice", prompt="alice's secret")
        session_id = first[0].session_id
        record = await guarded.decoder.store.load(session_id)
        assert record.owner == fingerprint("key-alice") and "key-alice" not in record.owner
        for call in (
            lambda: _generate(channel, "key-bob", prompt="let me in", session_id=session_id),
            lambda: stub.GetSession(coordinator_pb2.GetSessionRequest(session_id=session_id),
                                    metadata=(("authorization", "Bearer key-bob"),)),
            lambda: stub.DeleteSession(coordinator_pb2.DeleteSessionRequest(session_id=session_id),
                                       metadata=(("authorization", "Bearer key-bob"),)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call()
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        more = await _generate(channel, "key-alice", prompt="go on", session_id=session_id)
        assert more[-1].HasField("stats")
        info = await stub.GetSession(coordinator_pb2.GetSessionRequest(session_id=session_id),
                                     metadata=(("authorization", "Bearer key-alice"),))
        assert info.turns == 2
        bobs = await _generate(channel, "key-bob", prompt="my own")  # a key from the file works
        assert bobs[-1].HasField("stats")
