"""KV-cache snapshots: chunk encoding, the Redis append rules, and a failed-over target replica
restoring a session's cache instead of recomputing it, with the output unchanged."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
import torch

from conftest import start_stack
from helpers import generate
from specdec import models
from specdec.kv_cache import CausalLMRunner, SessionCache
from specdec.kv_snapshot import (
    APPENDED, FULL, NOT_CONTIGUOUS, OTHER_MODEL, SESSION_GONE, SNAPSHOT_STOPPED, PendingChunk, SnapshotSettings,
    Snapshots, SnapshotStore, SnapshotWriter, decode_chunks, encode_chunk, model_layer_shapes,
)
from specdec.session_store import SessionStore, snapshot_keys

SETTINGS = SnapshotSettings(max_pending_bytes=1 << 30, min_chunk_tokens=1, min_restore_tokens=1)


@pytest.fixture(scope="module")
def runner(tiny_target):
    model = models.load_model(str(tiny_target))
    return CausalLMRunner(model, vocab_size=model.config.vocab_size)


def _prefilled(runner, length: int, seed: int = 0) -> SessionCache:
    torch.manual_seed(seed)
    tokens = torch.randint(0, runner.vocab_size, (length,)).tolist()
    entry = SessionCache()
    runner.logits_from(entry, tokens, first=length - 1)
    return entry


def test_a_cache_rebuilt_from_chunks_gives_the_same_logits(runner):
    entry = _prefilled(runner, 40)
    chunks = [encode_chunk(entry.kv, entry.tokens, 0, 17), encode_chunk(entry.kv, entry.tokens, 17, 40)]
    snapshots = Snapshots(None, SETTINGS, runner.model.config, torch.float32, "cpu")
    restored = snapshots.rebuild(type("Snap", (), {"chunks": chunks, "length": 40})())
    assert restored.tokens == entry.tokens and restored.kv_len == 40 and restored.snapshot_len == 40
    for mine, theirs in zip(restored.kv.layers, entry.kv.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    more = entry.tokens + [5, 6, 7]
    from_snapshot, reused = runner.logits_from(restored, more, first=40)
    recomputed, _ = runner.logits_from(SessionCache(), more, first=40)
    assert reused == 40
    assert torch.allclose(from_snapshot, recomputed, atol=1e-5)


def test_chunks_that_do_not_fit_the_model_are_refused(runner):
    entry = _prefilled(runner, 12)
    shapes = model_layer_shapes(runner.model.config)
    first, second = encode_chunk(entry.kv, entry.tokens, 0, 6), encode_chunk(entry.kv, entry.tokens, 6, 12)
    with pytest.raises(ValueError, match="does not follow"):
        decode_chunks([second], shapes, torch.float32)  # a gap at the start
    with pytest.raises(ValueError, match="shorter"):
        decode_chunks([first[:-8]], shapes, torch.float32)  # truncated
    with pytest.raises(ValueError, match="longer"):
        decode_chunks([first], shapes[:-1], torch.float32)  # another model's layers
    tokens, layers = decode_chunks([first, second], shapes, torch.float32)
    assert tokens == entry.tokens and layers[0][0].shape[2] == 12


async def test_appends_are_contiguous_bounded_and_take_the_sessions_ttl(redis_server):
    client = aioredis.from_url(redis_server.url)
    try:
        session = await SessionStore(client, ttl_s=600).create(seed=1)
        sid = session.session_id
        store = SnapshotStore(client, "target", "model-a", max_session_bytes=100)
        assert await store.append(sid, 0, 4, b"x" * 40) == (APPENDED, 4)
        assert await store.append(sid, 0, 4, b"x" * 40) == (NOT_CONTIGUOUS, 4)  # a retry writes nothing twice
        assert await store.append(sid, 6, 8, b"y" * 20) == (NOT_CONTIGUOUS, 4)  # a gap is refused
        assert await store.append(sid, 4, 8, b"z" * 70) == (FULL, 4)  # 110 bytes > 100
        assert await store.append(sid, 4, 6, b"w" * 20) == (APPENDED, 6)
        snapshot = await store.load(sid)
        assert snapshot.length == 6 and snapshot.chunks == [b"x" * 40, b"w" * 20]
        chunks_key, meta_key = snapshot_keys(sid, "target")
        assert 590 < await client.ttl(chunks_key) <= 600 and 590 < await client.ttl(meta_key) <= 600
        other = SnapshotStore(client, "target", "model-b", max_session_bytes=100)
        assert (await other.append(sid, 6, 7, b"v"))[0] == OTHER_MODEL
        assert await other.load(sid) is None  # another model never reads them
        assert (await store.append("no-such-session", 0, 1, b"v"))[0] == SESSION_GONE
        # The session's commits renew the snapshot's TTL with the session's own.
        await client.expire(chunks_key, 5)
        await SessionStore(client, ttl_s=600).commit(sid, 0, [1, 2])
        assert await client.ttl(chunks_key) > 590
        await SessionStore(client, ttl_s=600).delete(sid)
        assert not await client.exists(chunks_key, meta_key)
    finally:
        await client.aclose()


async def test_the_writer_resynchronises_and_stops_where_redis_says(redis_server, runner):
    client = aioredis.from_url(redis_server.url)
    try:
        sid = (await SessionStore(client, ttl_s=600).create(seed=1)).session_id
        store = SnapshotStore(client, "target", "m", max_session_bytes=1 << 30)
        snapshots = Snapshots(store, SETTINGS, runner.model.config, torch.float32, "cpu")
        snapshots.writer.start()
        entry = _prefilled(runner, 30)
        snapshots.after_forward(sid, entry, committed_len=20)
        assert entry.snapshot_len == 20  # handed to the writer
        await snapshots.writer.flush()
        entry.snapshot_len = 10  # as if this replica lost track: Redis holds 20
        snapshots.after_forward(sid, entry, committed_len=30)
        await snapshots.writer.flush()
        assert entry.snapshot_len == 20  # resynchronised to what Redis holds, nothing written twice
        snapshots.after_forward(sid, entry, committed_len=30)
        await snapshots.writer.flush()
        assert (await store.load(sid)).length == 30
        gone = _prefilled(runner, 8)
        snapshots.after_forward("no-such-session", gone, committed_len=8)
        await snapshots.writer.flush()
        assert gone.snapshot_len == SNAPSHOT_STOPPED
        tiny = SnapshotWriter(store, max_pending_bytes=10)
        tiny.start()
        assert not tiny.submit(PendingChunk(sid, 30, 31, b"x" * 11, entry))  # over the bound: dropped
        await tiny.close()
        await snapshots.writer.close()
    finally:
        await client.aclose()


async def _stored_length(redis_url: str, session_id: str) -> int:
    """The target snapshot's length once the background writes have settled."""
    client = aioredis.from_url(redis_url)
    try:
        previous = -1
        for _ in range(50):
            value = await client.hget(snapshot_keys(session_id, "target")[1], "len")
            length = int(value or 0)
            if length == previous and length > 0:
                return length
            previous = length
            await asyncio.sleep(0.1)
        return previous
    finally:
        await client.aclose()


async def test_failed_over_replicas_restore_the_snapshot_and_change_nothing(
    redis_server, tiny_target, tiny_draft, stacks
):
    turn1 = dict(prompt="tell me a long story about the sea", max_new_tokens=90, k=3, ignore_eos=True)
    turn2 = dict(prompt="and then?", max_new_tokens=20, k=3, ignore_eos=True)
    async with grpc.aio.insecure_channel(stacks["model"].coordinator) as channel:
        first = await generate(channel, **turn1)
        undisturbed = await generate(channel, session_id=first.session_id, **turn2)

    stack = await start_stack(redis_server.url, tiny_target, str(tiny_draft), target_replicas=2, draft_replicas=2)
    targets, drafts = stack.started[:2], stack.started[2:4]
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            before = await generate(channel, **turn1)
            assert before.token_ids == first.token_ids
            stored = await _stored_length(redis_server.url, before.session_id)
            assert stored >= 64, "the home replica wrote the session's committed positions"
            # The session's target and draft replicas die between turns.
            home_target = targets[stack.decoder.target.replicas.order_for(before.session_id)[0]]
            home_draft = drafts[stack.decoder.draft.replicas.order_for(before.session_id)[0]]
            await home_target.server.stop(0)
            await home_draft.server.stop(0)
            after = await generate(channel, session_id=before.session_id, **turn2)
        assert after.token_ids == undisturbed.token_ids
        assert after.stats.target_reused_tokens == stored, "the other target restored instead of recomputing"
        assert after.stats.target_prefill_tokens == len(before.prompt_token_ids) + len(before.token_ids) \
            + len(after.prompt_token_ids) - stored
        other_draft = next(d for d in drafts if d is not home_draft)
        assert other_draft.metrics.registry.get_sample_value("specdec_kv_snapshot_restores_total") == 1
        assert after.stats.draft_fallback_rounds == 0
    finally:
        for server in stack.servers:
            await server.stop(0)


async def test_a_long_prefill_is_written_in_bounded_pieces(redis_server, runner, monkeypatch):
    from specdec import kv_snapshot

    client = aioredis.from_url(redis_server.url)
    try:
        sid = (await SessionStore(client, ttl_s=600).create(seed=1)).session_id
        snapshots = Snapshots(SnapshotStore(client, "target", "m", 1 << 30), SETTINGS, runner.model.config,
                              torch.float32, "cpu")
        monkeypatch.setattr(kv_snapshot, "MAX_CHUNK_BYTES", snapshots.bytes_per_token * 7)
        snapshots.writer.start()
        entry = _prefilled(runner, 30)
        snapshots.after_forward(sid, entry, committed_len=30)
        await snapshots.writer.flush()
        snapshot = await snapshots.store.load(sid)
        assert snapshot.length == 30 and len(snapshot.chunks) == 5  # 7 + 7 + 7 + 7 + 2 positions
        assert all(len(c) <= snapshots.bytes_per_token * 7 + 64 for c in snapshot.chunks)
        assert snapshots.rebuild(snapshot).tokens == entry.tokens
        await snapshots.writer.close()
    finally:
        await client.aclose()


async def test_deleting_a_session_frees_redis_and_every_replica(redis_server, tiny_target, tiny_draft, stacks):
    from specdec.session_store import all_snapshot_keys
    from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc

    stack = stacks["model"]
    client = aioredis.from_url(redis_server.url)
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            done = await generate(channel, prompt="a session to delete, long enough to snapshot", max_new_tokens=40)
            sid = done.session_id
            assert await _stored_length(redis_server.url, sid) > 0
            # While it generates, it cannot be deleted.
            call = stub.Generate(coordinator_pb2.GenerateRequest(session_id=sid, prompt="more", max_new_tokens=200,
                                                                 ignore_eos=True))
            await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as busy:
                await stub.DeleteSession(coordinator_pb2.DeleteSessionRequest(session_id=sid))
            assert busy.value.code() == grpc.StatusCode.ABORTED
            call.cancel()
            for _ in range(50):
                try:
                    reply = await stub.DeleteSession(coordinator_pb2.DeleteSessionRequest(session_id=sid))
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.ABORTED
                    await asyncio.sleep(0.1)
            assert reply.released_replicas == 2  # the target's cache and the draft model's
            assert not await client.exists(*all_snapshot_keys(sid), f"specdec:{{{sid}}}:meta",
                                            f"specdec:{{{sid}}}:tokens")
            for call in (stub.GetSession(coordinator_pb2.GetSessionRequest(session_id=sid)),
                         stub.DeleteSession(coordinator_pb2.DeleteSessionRequest(session_id=sid))):
                with pytest.raises(grpc.aio.AioRpcError) as gone:
                    await call
                assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await client.aclose()
