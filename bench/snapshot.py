"""Restore a session's KV cache from its Redis snapshot vs recompute its prefix.

A real target service (in this process, on loopback) holds a session of N committed tokens
(Spec-Bench prompt text). Each repetition drops the session from the service's cache, as if
another replica were now serving it, and times one Verify of one draft token:
  restore    the snapshot is in Redis: fetched, rebuilt, one position computed
  recompute  the snapshot was deleted: all N positions computed
The two alternate, so drift on the machine affects both alike. The answers must agree.

    python -m bench.snapshot --tokens 1000 [--model smollm2] [--device cpu] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from specdec.config import default_prompts_file
from specdec.launcher import Pipeline, start_redis
from specdec.session_store import SessionStore, all_snapshot_keys, snapshot_keys
from specdec.v1 import common_pb2, target_pb2, target_pb2_grpc
from specdec.access import bearer_metadata, new_token
from specdec.prefix import CommittedTokens
from specdec.wire import context_to_pb


def session_tokens(tokenizer, count: int, prompts: Path) -> list[int]:
    """`count` token ids of Spec-Bench prompt text, prompt after prompt."""
    ids: list[int] = []
    with open(prompts) as lines:
        for line in lines:
            ids += tokenizer.encode(json.loads(line)["turns"][0])
            if len(ids) >= count:
                return ids[:count]
    raise ValueError(f"{prompts} holds fewer than {count} tokens")


class _Authorized:
    """A stub whose calls carry the tier token."""

    def __init__(self, stub, metadata):
        self.stub, self.metadata = stub, metadata

    def __getattr__(self, name):
        method = getattr(self.stub, name)
        return lambda request: method(request, metadata=self.metadata)


async def measure(model: str, tokens: int, reps: int, device: str, redis_url: str | None,
                  prompts: Path | None = None) -> dict:
    from specdec import models
    from target_service import server as target_server
    from target_service.config import TargetConfig

    pipeline = Pipeline(redis_url=redis_url or "")
    if not redis_url:
        await start_redis(pipeline)
    client = aioredis.from_url(pipeline.redis_url)
    token = new_token()
    started = await target_server.start(TargetConfig(model=model, device=device, metrics_port=-1,
                                                     redis_url=pipeline.redis_url, tier_token=token))
    try:
        ids = session_tokens(models.load_tokenizer(model), tokens, prompts or default_prompts_file())
        store = SessionStore(client, ttl_s=3600)
        session = await store.create(seed=0)
        await store.commit(session.session_id, 0, ids)
        async with grpc.aio.insecure_channel(started.address, options=[
                ("grpc.max_receive_message_length", 64 << 20)]) as channel:
            stub = _Authorized(target_pb2_grpc.TargetServiceStub(channel), bearer_metadata(token))
            request = target_pb2.VerifyRequest(context=context_to_pb(session.session_id, CommittedTokens(ids), 0),
                                               draft_tokens=[ids[0]])
            first = await stub.Verify(request)  # computes the prefix and writes the snapshot
            stored = await _snapshot_settled(client, session.session_id, len(ids))
            snapshot = {key: await client.dump(key) for key in all_snapshot_keys(session.session_id)}
            snapshot = {key: value for key, value in snapshot.items() if value is not None}
            snapshot_bytes = int(await client.hget(snapshot_keys(session.session_id, "target")[1], "bytes"))
            times: dict[str, list[float]] = {"restore": [], "recompute": []}
            for _ in range(reps):
                for mode in ("restore", "recompute"):
                    await stub.Release(common_pb2.ReleaseRequest(session_id=session.session_id))
                    await client.delete(*snapshot)
                    if mode == "restore":
                        for key, value in snapshot.items():
                            await client.restore(key, 0, value, replace=True)
                    begin = time.perf_counter()
                    reply = await stub.Verify(request)
                    times[mode].append(time.perf_counter() - begin)
                    assert list(reply.argmax_tokens) == list(first.argmax_tokens), "restore changed the answer"
                    expected = len(ids) - 1 if mode == "restore" else 0  # the last position is recomputed for its logits
                    assert reply.cache.reused_tokens == expected, (mode, reply.cache.reused_tokens)
                    await _snapshot_settled(client, session.session_id, len(ids))  # the background write
        restore, recompute = statistics.median(times["restore"]), statistics.median(times["recompute"])
        return {
            "model": model, "device": device, "session_tokens": len(ids), "snapshot_tokens": stored,
            "snapshot_mib": snapshot_bytes / 2**20, "reps": reps,
            "restore_s": restore, "recompute_s": recompute, "speedup": recompute / restore,
            "restore_all_s": times["restore"], "recompute_all_s": times["recompute"],
        }
    finally:
        await started.server.stop(0)
        for cleanup in started.on_stop:
            await cleanup()
        await client.aclose()
        await pipeline.stop()


async def _snapshot_settled(client, session_id: str, expected: int) -> int:
    meta = snapshot_keys(session_id, "target")[1]
    for _ in range(600):
        if int(await client.hget(meta, "len") or 0) >= expected:
            return expected
        await asyncio.sleep(0.05)
    raise RuntimeError("the target did not write the session's snapshot within 30 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--redis-url", default=None, help="default: start a redis-server of its own")
    parser.add_argument("--prompts", default=str(default_prompts_file()), help="Spec-Bench style JSONL file")
    parser.add_argument("--out", default="", help="write the figures to this JSON file too")
    args = parser.parse_args()
    result = asyncio.run(measure(args.model, args.tokens, args.reps, args.device, args.redis_url, Path(args.prompts)))
    print(f"{result['session_tokens']}-token session, {result['model']} on {result['device']}: "
          f"snapshot {result['snapshot_mib']:.1f} MiB; Verify after restore {result['restore_s'] * 1000:.0f} ms, "
          f"after recompute {result['recompute_s'] * 1000:.0f} ms ({result['speedup']:.1f}x), "
          f"median of {result['reps']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
