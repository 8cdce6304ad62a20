"""KV-cache snapshots in Redis: a replica that gets a session it does not hold restores the
session's keys/values instead of recomputing the prefix.

Keys, next to the session's own (same {id} hash tag, so one Redis Cluster slot):
    specdec:{id}:kv:<tier>      list of chunks, each covering committed positions [start, end)
    specdec:{id}:kvmeta:<tier>  hash: len (positions stored), bytes, model (who may read them)
<tier> is "target" or "draft". Only committed positions are written, and only once: the
appending script checks the stored length (chunks stay contiguous whoever writes them: a
failed-over replica carries on where the dead one stopped) and that the chunk's token ids are
the session's committed tokens in Redis (a replica whose cache was not the session's cannot
write it). Snapshots live --snapshot-ttl-s after their last append (at most the session's own
TTL), shorter than the session.

Bounded across sessions too: every append is accounted in
    specdec:{specdec-kv}:index  sorted set "<tier>:<id>" -> time of its last append (ms)
    specdec:{specdec-kv}:bytes  hash "<tier>:<id>" -> bytes stored
    specdec:{specdec-kv}:total  bytes stored in all
and when the total passes --snapshot-max-total-bytes the least recently written snapshots are
deleted (entries older than the TTL leave the accounts as their keys expire).

A chunk is bytes: a header (start, end), the token ids, then keys and values of those positions
in the model's dtype, [layers, 2, kv_heads, end - start, head_dim].
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from redis import exceptions as redis_errors

from specdec.kv_cache import KVShape, SessionCache, SessionKV
from specdec.session_store import (SNAPSHOT_ACCOUNT_KEYS, SNAPSHOT_TIERS, log_id, session_key, snapshot_keys,
                                   snapshot_member)

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")  # start, end

# KEYS: session meta, session tokens, chunk list, snapshot meta.
# ARGV: start, end, chunk, model, max bytes, ttl ms, the chunk's token ids (int32 LE bytes).
# Returns {code, stored length}: 0 appended, 1 not contiguous (nothing written), 2 over the
# size bound, 3 session gone, 4 written by another model, 5 not the session's committed tokens.
_APPEND = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return {3, 0} end
local model = redis.call('HGET', KEYS[4], 'model')
local stored = tonumber(redis.call('HGET', KEYS[4], 'len') or '0')
if model and model ~= ARGV[4] then return {4, stored} end
if stored ~= tonumber(ARGV[1]) then return {1, stored} end
local first, last = 4 * tonumber(ARGV[1]), 4 * tonumber(ARGV[2]) - 1
if redis.call('GETRANGE', KEYS[2], first, last) ~= ARGV[7] then return {5, stored} end
local size = tonumber(redis.call('HGET', KEYS[4], 'bytes') or '0') + string.len(ARGV[3])
if size > tonumber(ARGV[5]) then return {2, stored} end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[4], 'len', ARGV[2], 'bytes', size, 'model', ARGV[4])
local keep = tonumber(ARGV[6])
if ttl > 0 and ttl < keep then keep = ttl end
redis.call('PEXPIRE', KEYS[3], keep)
redis.call('PEXPIRE', KEYS[4], keep)
return {0, tonumber(ARGV[2])}
"""

# KEYS: index, bytes, total. ARGV: member, bytes added, now ms, ttl ms, max total bytes.
# Records the append, drops entries whose keys have expired, and returns the members whose
# snapshots must be deleted (least recently written first) to bring the total under the bound.
_ACCOUNT = """
local member, now, ttl, limit = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
-- Scores strictly increase with each append (ties within a millisecond would break LRU order).
local score = now
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] and tonumber(newest[2]) >= score then score = tonumber(newest[2]) + 0.001 end
redis.call('ZADD', KEYS[1], score, member)
redis.call('HINCRBY', KEYS[2], member, ARGV[2])
local total = redis.call('INCRBY', KEYS[3], ARGV[2])
local victims = {}
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)) do
  total = redis.call('DECRBY', KEYS[3], tonumber(redis.call('HGET', KEYS[2], old) or '0'))
  redis.call('ZREM', KEYS[1], old)
  redis.call('HDEL', KEYS[2], old)
end
while total > limit do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not oldest or oldest == member then break end
  total = redis.call('DECRBY', KEYS[3], tonumber(redis.call('HGET', KEYS[2], oldest) or '0'))
  redis.call('ZREM', KEYS[1], oldest)
  redis.call('HDEL', KEYS[2], oldest)
  table.insert(victims, oldest)
end
return victims
"""

APPENDED, NOT_CONTIGUOUS, FULL, SESSION_GONE, OTHER_MODEL, NOT_COMMITTED = range(6)
SNAPSHOT_STOPPED = 2**62  # a snapshot_len no session reaches: nothing more is written for it
MAX_CHUNK_BYTES = 4 * 1024**2  # one write to Redis at most (a prompt's prefill is split)


# --- encoding: plain functions over a SessionKV -------------------------------------------------


def encode_chunk(kv: SessionKV, tokens: Sequence[int], start: int, end: int) -> bytes:
    """Positions [start, end) of a session's cache, with their token ids, as bytes."""
    span = kv.span(start, end).contiguous().cpu()
    return b"".join([_HEADER.pack(start, end), _token_bytes(tokens[start:end]), span.view(torch.uint8).numpy().tobytes()])


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def decode_chunks(chunks: Sequence[bytes], shape: KVShape) -> tuple[list[int], torch.Tensor]:
    """Chunks (in order, contiguous from 0) -> token ids and the span [layers, 2, heads, n, dim]."""
    item = torch.empty((), dtype=shape.dtype).element_size()
    tokens: list[int] = []
    spans: list[torch.Tensor] = []
    for chunk in chunks:
        start, end = _HEADER.unpack_from(chunk)
        if start != len(tokens) or end <= start:
            raise ValueError(f"snapshot chunk [{start}, {end}) does not follow {len(tokens)} positions")
        n = end - start
        offset = _HEADER.size
        tokens += np.frombuffer(chunk, dtype="<i4", count=n, offset=offset).tolist()
        offset += 4 * n
        size = shape.layers * 2 * shape.kv_heads * n * shape.head_dim * item
        if offset + size > len(chunk):
            raise ValueError("snapshot chunk is shorter than the model's layers need")
        if offset + size < len(chunk):
            raise ValueError("snapshot chunk is longer than the model's layers need")
        raw = torch.frombuffer(bytearray(memoryview(chunk)[offset:]), dtype=torch.uint8)
        spans.append(raw.view(shape.dtype).view(shape.layers, 2, shape.kv_heads, n, shape.head_dim))
    return tokens, torch.cat(spans, dim=3)


# --- Redis ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    length: int
    chunks: list[bytes]


class SnapshotStore:
    """Appends and reads one tier's snapshots. `model` names who wrote them (name, dtype,
    vocabulary): a replica of another model never reads them."""

    def __init__(self, client, tier: str, model: str, max_session_bytes: int, ttl_s: float = 3600.0,
                 max_total_bytes: int = 2**62):
        if tier not in SNAPSHOT_TIERS:
            raise ValueError(f"tier must be one of {SNAPSHOT_TIERS}")
        self.redis = client
        self.tier = tier
        self.model = model
        self.max_session_bytes = max_session_bytes
        self.ttl_ms = int(ttl_s * 1000)
        self.max_total_bytes = max_total_bytes
        self._append = client.register_script(_APPEND)
        self._account = client.register_script(_ACCOUNT)

    async def append(self, session_id: str, start: int, end: int, chunk: bytes, tokens: bytes) -> tuple[int, int]:
        """(code, stored length) as the script above returns them; an appended chunk is accounted
        and, past the total bound, the least recently written snapshots are deleted."""
        chunks, meta = snapshot_keys(session_id, self.tier)
        code, stored = await self._append(
            keys=[session_key(session_id, "meta"), session_key(session_id, "tokens"), chunks, meta],
            args=[start, end, chunk, self.model, self.max_session_bytes, self.ttl_ms, tokens],
        )
        if int(code) == APPENDED:
            victims = await self._account(keys=SNAPSHOT_ACCOUNT_KEYS, args=[
                snapshot_member(self.tier, session_id), len(chunk), int(time.time() * 1000), self.ttl_ms,
                self.max_total_bytes])
            for victim in victims:
                tier, _, victim_id = victim.decode().partition(":")
                await self.redis.delete(*snapshot_keys(victim_id, tier))
        return int(code), int(stored)

    async def load(self, session_id: str) -> Snapshot | None:
        chunks_key, meta_key = snapshot_keys(session_id, self.tier)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.lrange(chunks_key, 0, -1)
            meta, chunks = await pipe.execute()
        if not meta or meta.get(b"model", b"").decode() != self.model or not chunks:
            return None
        return Snapshot(int(meta[b"len"]), chunks)


@dataclass
class PendingChunk:
    session_id: str
    start: int
    end: int
    data: bytes
    tokens: bytes  # the chunk's token ids, checked against the session's committed tokens
    entry: SessionCache  # whose snapshot_len the outcome corrects


class SnapshotWriter:
    """Writes chunks to Redis in the background, in order, with a bound on bytes in flight.

    `submit` is called on the model worker thread and never blocks it: a chunk that does not
    fit in the bound is dropped, and the session's snapshot_len goes back so the next chunk
    covers those positions again.
    """

    def __init__(self, store: SnapshotStore, max_pending_bytes: int, metrics=None):
        self.store = store
        self.max_pending_bytes = max_pending_bytes
        self.metrics = metrics
        self.pending_bytes = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[PendingChunk] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Call from the event loop that will do the writes."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._task = self._loop.create_task(self._drain())

    def submit(self, chunk: PendingChunk) -> bool:
        if self._loop is None:
            return False
        with self._lock:
            if self.pending_bytes + len(chunk.data) > self.max_pending_bytes:
                self._count("dropped")
                return False
            self.pending_bytes += len(chunk.data)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
        return True

    async def _drain(self) -> None:
        assert self._queue is not None
        while True:
            chunk = await self._queue.get()
            try:
                await self._write(chunk)
            finally:
                with self._lock:
                    self.pending_bytes -= len(chunk.data)
                self._queue.task_done()

    async def _write(self, chunk: PendingChunk) -> None:
        try:
            code, stored = await self.store.append(chunk.session_id, chunk.start, chunk.end, chunk.data, chunk.tokens)
        except (redis_errors.RedisError, OSError) as exc:
            log.warning("KV snapshot of session %s not written (%s); the next round retries it",
                        log_id(chunk.session_id), type(exc).__name__)
            chunk.entry.snapshot_len = min(chunk.entry.snapshot_len, chunk.start)
            self._count("failed")
            return
        if code == APPENDED:
            self._count("written", len(chunk.data))
        elif code == NOT_CONTIGUOUS:
            chunk.entry.snapshot_len = stored  # resynchronise: the next chunk starts where Redis is
        elif code == NOT_COMMITTED:
            # Not (yet) the session's committed tokens in Redis: try again from here next round.
            chunk.entry.snapshot_len = min(chunk.entry.snapshot_len, chunk.start)
            self._count("refused")
        else:  # full, session gone or another model's: stop snapshotting this session here
            chunk.entry.snapshot_len = SNAPSHOT_STOPPED
            self._count("refused")

    def _count(self, outcome: str, nbytes: int = 0) -> None:
        if self.metrics is not None:
            self.metrics.snapshot_chunks.labels(outcome=outcome).inc()
            self.metrics.snapshot_bytes.inc(nbytes)

    async def flush(self, timeout_s: float = 5.0) -> None:
        if self._queue is not None:
            await asyncio.wait_for(self._queue.join(), timeout_s)

    async def close(self) -> None:
        if self._task is not None:
            try:
                await self.flush()
            except asyncio.TimeoutError:
                pass
            self._task.cancel()


# --- what a service does with them --------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotSettings:
    max_pending_bytes: int  # bound on chunks waiting to be written, per service
    min_chunk_tokens: int  # committed positions gathered before a chunk is written
    min_restore_tokens: int  # shorter sessions are recomputed, not restored


class Snapshots:
    """A service's side: after each forward, hand new committed positions to the writer; for a
    session it does not hold, fetch the snapshot and rebuild the cache from it."""

    def __init__(self, store: SnapshotStore, settings: SnapshotSettings, shape: KVShape, metrics=None):
        self.store = store
        self.settings = settings
        self.writer = SnapshotWriter(store, settings.max_pending_bytes, metrics)
        self.shape = shape
        self.metrics = metrics
        self.bytes_per_token = shape.bytes_per_token

    def after_forward(self, session_id: str, entry: SessionCache, committed_len: int) -> None:
        """On the worker thread, right after entry's cache was extended past committed_len.
        A long stretch (a prompt's prefill) goes in pieces of at most MAX_CHUNK_BYTES, so no
        single write holds the service's event loop or Redis for long."""
        start, end = entry.snapshot_len, min(committed_len, entry.kv_len)
        if entry.kv is None or end - start < self.settings.min_chunk_tokens:
            return
        step = max(1, MAX_CHUNK_BYTES // max(1, self.bytes_per_token))
        for piece_start in range(start, end, step):
            piece_end = min(end, piece_start + step)
            data = encode_chunk(entry.kv, entry.tokens, piece_start, piece_end)
            pending = PendingChunk(session_id, piece_start, piece_end, data,
                                   _token_bytes(entry.tokens[piece_start:piece_end]), entry)
            if not self.writer.submit(pending):
                return  # dropped: the next round starts again from here
            entry.snapshot_len = piece_end

    async def fetch(self, session_id: str) -> Snapshot | None:
        """The session's snapshot, or None (none, too short, or Redis unreachable: recompute)."""
        try:
            snapshot = await self.store.load(session_id)
        except (redis_errors.RedisError, OSError) as exc:
            log.warning("KV snapshot of session %s not read (%s); recomputing instead", log_id(session_id),
                        type(exc).__name__)
            return None
        if snapshot is None or snapshot.length < self.settings.min_restore_tokens:
            return None
        return snapshot

    def record_restore(self, snapshot: Snapshot, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.snapshot_restores.inc()
            self.metrics.snapshot_restored_tokens.inc(snapshot.length)
            self.metrics.snapshot_restore_seconds.observe(seconds)

    def rebuild(self, snapshot: Snapshot) -> SessionCache:
        """On the worker thread: a SessionCache holding the snapshot's positions."""
        tokens, span = decode_chunks(snapshot.chunks, self.shape)
        return SessionCache(tokens=tokens, kv=SessionKV.from_span(self.shape, span), snapshot_len=len(tokens))
