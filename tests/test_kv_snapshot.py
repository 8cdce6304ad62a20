"""KV-cache snapshots: chunk encoding, the Redis append rules, and a failed-over target replica
restoring a session's cache instead of recomputing it, with the output unchanged."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
import torch

from conftest import RedisServer, start_stack
from helpers import generate
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.kv_snapshot import (
    APPENDED, FULL, NOT_COMMITTED, NOT_CONTIGUOUS, OTHER_MODEL, SESSION_GONE, SNAPSHOT_STOPPED, PendingChunk,
    SnapshotSettings, Snapshots, SnapshotStore, SnapshotWriter, decode_chunks, encode_chunk,
)
from specdec.runner import ForwardJob, ModelRunner
from specdec.session_store import SNAPSHOT_ACCOUNT_KEYS, SessionStore, snapshot_keys

SETTINGS = SnapshotSettings(max_pending_bytes=1 << 30, min_chunk_tokens=1, min_restore_tokens=1)


@pytest.fixture(scope="module")
def runner(tiny_target):
    model = models.load_model(str(tiny_target))
    return ModelRunner(model, vocab_size=model.config.vocab_size)


def _tokens(runner, length: int, seed: int = 0) -> list[int]:
    torch.manual_seed(seed)
    return torch.randint(0, runner.vocab_size, (length,)).tolist()


def _prefilled(runner, length: int, seed: int = 0) -> SessionCache:
    entry = SessionCache()
    runner.forward([ForwardJob(entry, _tokens(runner, length, seed), length - 1)])
    return entry


def _ids(tokens) -> bytes:
    import numpy as np

    return np.asarray(tokens, dtype="<i4").tobytes()


async def _session(client, tokens: list[int], ttl_s: int = 600) -> str:
    """A session in Redis whose committed tokens are `tokens`."""
    store = SessionStore(client, ttl_s=ttl_s)
    session_id = (await store.create(seed=1)).session_id
    await store.commit(session_id, 0, tokens)
    return session_id


def test_a_cache_rebuilt_from_chunks_gives_the_same_logits(runner):
    entry = _prefilled(runner, 40)
    chunks = [encode_chunk(entry.kv, entry.tokens, 0, 17), encode_chunk(entry.kv, entry.tokens, 17, 40)]
    snapshots = Snapshots(None, SETTINGS, runner.kv_shape)
    restored = snapshots.rebuild(type("Snap", (), {"chunks": chunks, "length": 40})())
    assert restored.tokens == entry.tokens and restored.kv_len == 40 and restored.snapshot_len == 40
    assert torch.equal(restored.kv.span(0, 40), entry.kv.span(0, 40))
    more = entry.tokens + [5, 6, 7]
    from_snapshot = runner.forward([ForwardJob(restored, more, 40)])[0]
    recomputed = runner.forward([ForwardJob(SessionCache(), more, 40)])[0]
    assert from_snapshot.reused == 40
    assert torch.equal(from_snapshot.logits, recomputed.logits)


def test_chunks_that_do_not_fit_the_model_are_refused(runner):
    from dataclasses import replace

    entry = _prefilled(runner, 12)
    shape = runner.kv_shape
    first, second = encode_chunk(entry.kv, entry.tokens, 0, 6), encode_chunk(entry.kv, entry.tokens, 6, 12)
    with pytest.raises(ValueError, match="does not follow"):
        decode_chunks([second], shape)  # a gap at the start
    with pytest.raises(ValueError, match="shorter"):
        decode_chunks([first[:-8]], shape)  # truncated
    with pytest.raises(ValueError, match="longer"):
        decode_chunks([first], replace(shape, layers=shape.layers - 1))  # another model's layers
    tokens, span = decode_chunks([first, second], shape)
    assert tokens == entry.tokens and span.shape[3] == 12


async def test_appends_are_contiguous_bounded_committed_and_expire_before_the_session(redis_server):
    client = aioredis.from_url(redis_server.url)
    try:
        committed = [1, 2, 3, 4, 5, 6, 7, 8]
        sid = await _session(client, committed)
        store = SnapshotStore(client, "target", "model-a", max_session_bytes=100, ttl_s=300)
        assert await store.append(sid, 0, 4, b"x" * 40, _ids(committed[:4])) == (APPENDED, 4)
        assert await store.append(sid, 0, 4, b"x" * 40, _ids(committed[:4])) == (NOT_CONTIGUOUS, 4)  # no twice
        assert await store.append(sid, 6, 8, b"y" * 20, _ids(committed[6:8])) == (NOT_CONTIGUOUS, 4)  # a gap
        assert await store.append(sid, 4, 8, b"z" * 70, _ids(committed[4:8])) == (FULL, 4)  # 110 bytes > 100
        # Positions whose tokens are not the session's committed ones are never written.
        assert await store.append(sid, 4, 6, b"w" * 20, _ids([9, 9])) == (NOT_COMMITTED, 4)
        assert await store.append(sid, 4, 6, b"w" * 20, _ids(committed[4:6])) == (APPENDED, 6)
        snapshot = await store.load(sid)
        assert snapshot.length == 6 and snapshot.chunks == [b"x" * 40, b"w" * 20]
        chunks_key, meta_key = snapshot_keys(sid, "target")
        # The snapshot's own TTL, shorter than the session's (600 s), and not renewed by commits.
        assert 290 < await client.ttl(chunks_key) <= 300 and 290 < await client.ttl(meta_key) <= 300
        await SessionStore(client, ttl_s=600).commit(sid, 8, [9])
        assert await client.ttl(chunks_key) <= 300
        other = SnapshotStore(client, "target", "model-b", max_session_bytes=100)
        assert (await other.append(sid, 6, 7, b"v", _ids(committed[6:7])))[0] == OTHER_MODEL
        assert await other.load(sid) is None  # another model never reads them
        assert (await store.append("no-such-session", 0, 1, b"v", _ids([1])))[0] == SESSION_GONE
        await SessionStore(client, ttl_s=600).delete(sid)
        assert not await client.exists(chunks_key, meta_key)
    finally:
        await client.aclose()


async def test_all_snapshots_together_stay_under_their_bound(tmp_path):
    redis = RedisServer(tmp_path)  # its own: other tests' snapshots must not count here
    redis.start()
    client = aioredis.from_url(redis.url)
    try:
        store = SnapshotStore(client, "target", "m", max_session_bytes=10_000, max_total_bytes=250)
        sessions = []
        for i in range(6):  # 6 x 100 bytes into a bound of 250: the oldest go
            sid = await _session(client, [i, i, i])
            assert (await store.append(sid, 0, 3, bytes([i]) * 100, _ids([i, i, i])))[0] == APPENDED
            sessions.append(sid)
        kept = [sid for sid in sessions if await client.exists(snapshot_keys(sid, "target")[0])]
        assert kept == sessions[-2:], "the least recently written snapshots are deleted first"
        assert int(await client.get(SNAPSHOT_ACCOUNT_KEYS[2])) == 200
        await SessionStore(client, ttl_s=600).delete(sessions[-1])  # a deleted session leaves the accounts
        assert int(await client.get(SNAPSHOT_ACCOUNT_KEYS[2])) == 100
        assert await client.zcard(SNAPSHOT_ACCOUNT_KEYS[0]) == 1
    finally:
        await client.aclose()
        redis.stop()


async def test_the_writer_resynchronises_and_stops_where_redis_says(redis_server, runner):
    client = aioredis.from_url(redis_server.url)
    try:
        entry = _prefilled(runner, 30)
        sid = await _session(client, entry.tokens)
        store = SnapshotStore(client, "target", "m", max_session_bytes=1 << 30)
        snapshots = Snapshots(store, SETTINGS, runner.kv_shape)
        snapshots.writer.start()
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
        # A cache whose tokens are not the session's (poisoned) writes nothing, and tries again later.
        stranger = _prefilled(runner, 30, seed=9)
        other_sid = await _session(client, entry.tokens)
        snapshots.after_forward(other_sid, stranger, committed_len=30)
        await snapshots.writer.flush()
        assert stranger.snapshot_len == 0 and await store.load(other_sid) is None
        tiny = SnapshotWriter(store, max_pending_bytes=10)
        tiny.start()
        assert not tiny.submit(PendingChunk(sid, 30, 31, b"x" * 11, b"", entry))  # over the bound: dropped
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
        entry = _prefilled(runner, 30)
        sid = await _session(client, entry.tokens)
        snapshots = Snapshots(SnapshotStore(client, "target", "m", 1 << 30), SETTINGS, runner.kv_shape)
        monkeypatch.setattr(kv_snapshot, "MAX_CHUNK_BYTES", snapshots.bytes_per_token * 7)
        snapshots.writer.start()
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


async def test_a_reply_does_not_wait_for_its_snapshots_copy(redis_server, runner):
    """The model thread copies a pass's new committed positions out for the snapshot after the
    pass's outcomes go back (the next job on that thread, before any other pass can change the
    cache), and closing the host waits for that copy and its write."""
    import threading
    from types import SimpleNamespace

    from specdec.prefix import prefix_digest
    from specdec.service_base import ModelFacts, SessionHost
    from specdec.serving import ModelWorker
    from specdec.wire import ContextDelta

    client = aioredis.from_url(redis_server.url)
    worker = ModelWorker("snapshot-test")
    try:
        tokens = _tokens(runner, 24)
        sid = await _session(client, tokens)
        snapshots = Snapshots(SnapshotStore(client, "target", "m", max_session_bytes=1 << 30), SETTINGS,
                              runner.kv_shape)
        snapshots.writer.start()
        host = SessionHost(ModelFacts("m", "model", runner.vocab_size, "", 512, ()), 1 << 30, worker, snapshots)
        copying, copied = threading.Event(), threading.Event()
        after_forward = snapshots.after_forward

        def slow_copy(*args) -> None:
            copying.wait(10)
            after_forward(*args)
            copied.set()

        snapshots.after_forward = slow_copy
        request = SimpleNamespace(context=ContextDelta(sid, len(tokens), 0, tuple(tokens), prefix_digest(tokens)))
        outcomes = (await worker.run(lambda: host.run_batch(
            [request], lambda request, entry, committed: ForwardJob(entry, committed, len(committed) - 1),
            lambda jobs: runner.forward(jobs)))).value
        assert outcomes[0].logits.shape[0] == 1 and not copied.is_set()  # the outcome came back first
        copying.set()
        await host.close()  # the copy, then its write to Redis
        assert copied.is_set() and (await SnapshotStore(client, "target", "m", 1 << 30).load(sid)).length == 24
    finally:
        worker.shutdown()
        await client.aclose()
