"""KV-cache snapshots in Redis: a replica that gets a session it does not hold restores the
session's keys/values instead of recomputing the prefix.

Keys, next to the session's own (same {id} hash tag, so one Redis Cluster slot):
    specdec:{id}:kv:<tier>      list of chunks, each covering committed positions [start, end)
    specdec:{id}:kvmeta:<tier>  hash: len (positions stored), bytes, model (who may read them)
<tier> is "target" or "draft". Only committed positions are written, and only once: the stored
length is checked by the appending script, so chunks stay contiguous whoever writes them (a
failed-over replica carries on where the dead one stopped). The keys take the session's TTL on
every append, and SessionStore.commit renews them with the session's.

A chunk is bytes: a header (start, end), the token ids, then per layer the keys and values of
those positions in the model's dtype, [1, kv_heads, end - start, head_dim] each.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from redis import exceptions as redis_errors

from specdec.session_store import SNAPSHOT_TIERS, log_id, session_key, snapshot_keys

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")  # start, end

# KEYS: session meta, chunk list, snapshot meta. ARGV: start, end, chunk, model, max bytes.
# Returns {code, stored length}: 0 appended, 1 not contiguous (nothing written), 2 over the
# size bound, 3 session gone, 4 written by another model.
_APPEND = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return {3, 0} end
local model = redis.call('HGET', KEYS[3], 'model')
local stored = tonumber(redis.call('HGET', KEYS[3], 'len') or '0')
if model and model ~= ARGV[4] then return {4, stored} end
if stored ~= tonumber(ARGV[1]) then return {1, stored} end
local size = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0') + string.len(ARGV[3])
if size > tonumber(ARGV[5]) then return {2, stored} end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[3], 'len', ARGV[2], 'bytes', size, 'model', ARGV[4])
for _, key in ipairs({KEYS[2], KEYS[3]}) do
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) else redis.call('PERSIST', key) end
end
return {0, tonumber(ARGV[2])}
"""

APPENDED, NOT_CONTIGUOUS, FULL, SESSION_GONE, OTHER_MODEL = range(5)
SNAPSHOT_STOPPED = 2**62  # a snapshot_len no session reaches: nothing more is written for it
MAX_CHUNK_BYTES = 4 * 1024**2  # one write to Redis at most (a prompt's prefill is split)


# --- encoding: plain functions over a DynamicCache -------------------------------------------


def encode_chunk(kv, tokens: Sequence[int], start: int, end: int) -> bytes:
    """Positions [start, end) of a batch-1 DynamicCache, with their token ids, as bytes."""
    parts = [_HEADER.pack(start, end), np.asarray(tokens[start:end], dtype="<i4").tobytes()]
    for layer in kv.layers:
        for tensor in (layer.keys, layer.values):
            part = tensor[..., start:end, :].contiguous().cpu()
            parts.append(part.view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


@dataclass(frozen=True)
class LayerShape:
    kv_heads: int
    head_dim: int


def decode_chunks(chunks: Sequence[bytes], shapes: Sequence[LayerShape], dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Chunks (in order, contiguous from 0) -> token ids and per layer (keys, values) tensors."""
    item = torch.empty((), dtype=dtype).element_size()
    tokens: list[int] = []
    per_layer: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in shapes]
    for chunk in chunks:
        start, end = _HEADER.unpack_from(chunk)
        if start != len(tokens) or end <= start:
            raise ValueError(f"snapshot chunk [{start}, {end}) does not follow {len(tokens)} positions")
        n = end - start
        offset = _HEADER.size
        tokens += np.frombuffer(chunk, dtype="<i4", count=n, offset=offset).tolist()
        offset += 4 * n
        for shape, (keys, values) in zip(shapes, per_layer):
            size = shape.kv_heads * n * shape.head_dim * item
            for target in (keys, values):
                if offset + size > len(chunk):
                    raise ValueError("snapshot chunk is shorter than the model's layers need")
                raw = torch.frombuffer(bytearray(memoryview(chunk)[offset : offset + size]), dtype=torch.uint8)
                target.append(raw.view(dtype).view(1, shape.kv_heads, n, shape.head_dim))
                offset += size
        if offset != len(chunk):
            raise ValueError("snapshot chunk is longer than the model's layers need")
    layers = [(torch.cat(k, dim=2).to(device), torch.cat(v, dim=2).to(device)) for k, v in per_layer]
    return tokens, layers


def model_layer_shapes(config) -> list[LayerShape]:
    """What a DynamicCache of this Hugging Face config holds per layer (no forward needed)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [LayerShape(heads, head_dim)] * config.num_hidden_layers


# --- Redis ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    length: int
    chunks: list[bytes]


class SnapshotStore:
    """Appends and reads one tier's snapshots. `model` names who wrote them (name, dtype,
    vocabulary): a replica of another model never reads them."""

    def __init__(self, client, tier: str, model: str, max_session_bytes: int):
        if tier not in SNAPSHOT_TIERS:
            raise ValueError(f"tier must be one of {SNAPSHOT_TIERS}")
        self.redis = client
        self.tier = tier
        self.model = model
        self.max_session_bytes = max_session_bytes
        self._append = client.register_script(_APPEND)

    async def append(self, session_id: str, start: int, end: int, chunk: bytes) -> tuple[int, int]:
        """(code, stored length) as the script above returns them."""
        chunks, meta = snapshot_keys(session_id, self.tier)
        code, stored = await self._append(
            keys=[session_key(session_id, "meta"), chunks, meta],
            args=[start, end, chunk, self.model, self.max_session_bytes],
        )
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
    entry: object  # the SessionCache whose snapshot_len the outcome corrects


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
            code, stored = await self.store.append(chunk.session_id, chunk.start, chunk.end, chunk.data)
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

    def __init__(self, store: SnapshotStore, settings: SnapshotSettings, model_config, dtype: torch.dtype,
                 device: torch.device | str, metrics=None):
        self.store = store
        self.settings = settings
        self.writer = SnapshotWriter(store, settings.max_pending_bytes, metrics)
        self.model_config = model_config
        self.shapes = model_layer_shapes(model_config)
        self.dtype = dtype
        self.device = device
        self.metrics = metrics
        item = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = sum(2 * shape.kv_heads * shape.head_dim * item for shape in self.shapes)

    def after_forward(self, session_id: str, entry, committed_len: int) -> None:
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
            if not self.writer.submit(PendingChunk(session_id, piece_start, piece_end, data, entry)):
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

    def rebuild(self, snapshot: Snapshot):
        """On the worker thread: a SessionCache holding the snapshot's positions."""
        from transformers import DynamicCache

        from specdec.kv_cache import SessionCache

        tokens, layers = decode_chunks(snapshot.chunks, self.shapes, self.dtype, self.device)
        cache = DynamicCache(config=self.model_config)
        for index, (keys, values) in enumerate(layers):
            cache.update(keys, values, index)
        return SessionCache(tokens=tokens, kv=cache, snapshot_len=len(tokens))

