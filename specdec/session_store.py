"""Sessions in Redis, the source of truth: committed tokens, seed, turns, status, last stats.

Keys (the {id} hash tag keeps a session's keys in one Redis Cluster slot):
    specdec:{id}:meta    hash: seed, turns, status, created, updated, params (JSON: the current
                         turn's sampling parameters, k, limits, stop strings), turn_start and
                         turn_prompt_len (where the current turn's prompt sits in tokens),
                         stats (JSON of the last finished turn)
    specdec:{id}:tokens  string: committed token ids as little-endian int32
    specdec:{id}:lease   string: owner of the running Generate; renewed by every commit, it
                         expires lease_s after a coordinator dies, so the session can be resumed
    specdec:{id}:kv:*    the draft and target tiers' KV-cache snapshots (specdec.kv_snapshot), with
                         their accounts across sessions under specdec:{specdec-kv}:*
The session's own keys carry the session TTL, renewed on each commit; the KV snapshots have a
shorter TTL of their own (specdec.kv_snapshot).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import numpy as np
import redis.asyncio as aioredis

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from specdec.errors import Aborted, NotFound

# Append a round atomically, only if the stored length is the one the writer saw: a round
# is never half written, and a stale writer (a coordinator that lost its lease) cannot append.
# The lease is renewed in the same script, so a round costs one round trip to Redis.
# A retry of a commit whose reply was lost (the connection dropped after Redis applied it) finds
# exactly its own bytes at its place, and succeeds again instead of failing as a stale writer.
_COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local at = tonumber(ARGV[1])
local stored = redis.call('STRLEN', KEYS[2])
if stored == at then
  redis.call('APPEND', KEYS[2], ARGV[2])
elseif stored ~= at + string.len(ARGV[2]) or redis.call('GETRANGE', KEYS[2], at, stored - 1) ~= ARGV[2] then
  return -2
end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return redis.call('STRLEN', KEYS[2])
"""

# Close a turn that ended early (the client went away, a dependency failed): it can no longer be
# resumed, and its stats say why it ended.
_CLOSE_TURN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

_ACQUIRE_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HSET', KEYS[2], 'status', 'generating')
  return 1
end
return 0
"""

_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'status', 'idle')
  return 1
end
return 0
"""


SNAPSHOT_TIERS = ("target", "draft")
# The KV snapshots' accounts across sessions (specdec.kv_snapshot): one hash tag of their own.
SNAPSHOT_ACCOUNT_KEYS = ["specdec:{specdec-kv}:index", "specdec:{specdec-kv}:bytes", "specdec:{specdec-kv}:total"]

# KEYS: the accounts. ARGV: members ("<tier>:<id>"). Takes deleted snapshots out of them.
_FORGET_SNAPSHOTS = """
for _, member in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    redis.call('DECRBY', KEYS[3], tonumber(redis.call('HGET', KEYS[2], member) or '0'))
  end
  redis.call('HDEL', KEYS[2], member)
end
return 0
"""


def snapshot_member(tier: str, session_id: str) -> str:
    return f"{tier}:{session_id}"


def redis_client(url: str, timeout_s: float) -> aioredis.Redis:
    """A Redis client whose calls have a deadline, and which reconnects once before it gives up:
    after a Redis restart, the first call on a pooled connection finds it closed, and must not
    fail when Redis is up again."""
    return aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                             retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])


def log_id(session_id: str) -> str:
    """What logs say instead of a session id (ids are bearer-like secrets): a short digest."""
    return "s:" + hashlib.sha256(session_id.encode()).hexdigest()[:10]


def session_key(session_id: str, name: str) -> str:
    return f"specdec:{{{session_id}}}:{name}"


def snapshot_keys(session_id: str, tier: str) -> tuple[str, str]:
    """A tier's KV-snapshot chunk list and its meta hash (specdec.kv_snapshot)."""
    return session_key(session_id, f"kv:{tier}"), session_key(session_id, f"kvmeta:{tier}")


def all_snapshot_keys(session_id: str) -> list[str]:
    return [key for tier in SNAPSHOT_TIERS for key in snapshot_keys(session_id, tier)]


@dataclass
class SessionRecord:
    session_id: str
    tokens: list[int]
    seed: int
    turns: int
    status: str
    owner: str = ""  # fingerprint of the API key that created it ("" without keys)
    turn_open: bool = False  # a turn started and did not finish (its coordinator died)
    turn_start: int = 0  # where the current (or last) turn's prompt begins in tokens
    turn_prompt_len: int = 0
    params: dict | None = None
    stats: dict | None = None


def _pack(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def _unpack(data: bytes | None) -> list[int]:
    return np.frombuffer(data or b"", dtype="<i4").tolist()


class SessionStore:
    def __init__(self, client: aioredis.Redis, ttl_s: int, lease_s: float = 10.0):
        self.redis = client
        self.ttl_s = ttl_s
        self.lease_ms = int(lease_s * 1000)
        self._commit = client.register_script(_COMMIT)
        self._close_turn = client.register_script(_CLOSE_TURN)
        self._forget_snapshots = client.register_script(_FORGET_SNAPSHOTS)
        self._acquire = client.register_script(_ACQUIRE_LEASE)
        self._release = client.register_script(_RELEASE_LEASE)

    @staticmethod
    def _keys(session_id: str) -> tuple[str, str, str]:
        return session_key(session_id, "meta"), session_key(session_id, "tokens"), session_key(session_id, "lease")

    async def create(self, seed: int, owner: str = "") -> SessionRecord:
        # 144 random bits: unguessable; hex so an id never starts with "-" (a flag on a command line).
        session_id = secrets.token_hex(18)
        meta, tokens, _ = self._keys(session_id)
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(meta, mapping={"seed": str(seed), "turns": 0, "status": "idle", "owner": owner,
                                     "created": now, "updated": now})
            pipe.set(tokens, b"")
            pipe.expire(meta, self.ttl_s)
            pipe.expire(tokens, self.ttl_s)
            await pipe.execute()
        return SessionRecord(session_id, [], seed, 0, "idle", owner)

    async def load(self, session_id: str) -> SessionRecord:
        meta, tokens, _ = self._keys(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta)
            pipe.get(tokens)
            fields, data = await pipe.execute()
        if not fields:
            raise NotFound("the session does not exist or has expired; start a new one")
        return SessionRecord(
            session_id=session_id,
            tokens=_unpack(data),
            seed=int(fields[b"seed"]),
            turns=int(fields[b"turns"]),
            status=fields[b"status"].decode(),
            owner=fields.get(b"owner", b"").decode(),
            turn_open=fields.get(b"turn_open") == b"1",
            turn_start=int(fields.get(b"turn_start", 0)),
            turn_prompt_len=int(fields.get(b"turn_prompt_len", 0)),
            params=json.loads(fields[b"params"]) if b"params" in fields else None,
            stats=json.loads(fields[b"stats"]) if b"stats" in fields else None,
        )

    async def commit(self, session_id: str, committed_len: int, new_tokens: Sequence[int], **fields) -> None:
        """Append new_tokens after exactly committed_len tokens, set meta fields and renew the
        lease, atomically."""
        meta, tokens, lease = self._keys(session_id)
        args: list = [committed_len * 4, _pack(new_tokens), self.ttl_s, self.lease_ms]
        for name, value in {**fields, "updated": time.time()}.items():
            args += [name, value if isinstance(value, (str, bytes, int, float)) else json.dumps(value)]
        result = await self._commit(keys=[meta, tokens, lease], args=args)
        if result == -1:
            raise NotFound("the session expired or was deleted during generation")
        if result == -2:
            raise Aborted("the session was changed by another writer; reload it and retry")

    async def close_turn(self, session_id: str, turns: int, stats: dict) -> None:
        """Mark the open turn finished (it ended early), with its stats."""
        meta, _, _ = self._keys(session_id)
        await self._close_turn(keys=[meta], args=["turn_open", "0", "turns", turns, "stats", json.dumps(stats),
                                                 "updated", time.time()])

    @asynccontextmanager
    async def lease(self, session_id: str) -> AsyncIterator[None]:
        """Exclusive right to generate in a session; a second concurrent Generate is ABORTED."""
        meta, _, lease = self._keys(session_id)
        owner = secrets.token_hex(8)
        if not await self._acquire(keys=[lease, meta], args=[owner, self.lease_ms]):
            raise Aborted("the session is already generating in another call; wait for it to finish")
        try:
            yield
        finally:
            await self._release(keys=[lease, meta], args=[owner])

    async def delete(self, session_id: str) -> None:
        await self.redis.delete(*self._keys(session_id), *all_snapshot_keys(session_id))
        await self._forget_snapshots(keys=SNAPSHOT_ACCOUNT_KEYS,
                                     args=[snapshot_member(tier, session_id) for tier in SNAPSHOT_TIERS])
