"""Hostile calls against a running pipeline, counted: what every service answers to garbage, to
fuzzed fields, to strangers and to unknown methods, and whether its memory stays flat.

    python -m bench.hostile --calls 3000            # make bench-hostile

Starts `specdec up` on a tiny random model (or --target), then sends, round-robin over every
method of every service: undecodable bytes, random bytes, well-formed requests with random
fields (ids, lengths, temperatures, token ids), calls without the tier token, calls to unknown
method names, 100,000-character session ids. Reports the status codes (UNKNOWN and INTERNAL
must not appear), the size of each /metrics page, Redis's used memory and each process's
resident memory before, after the first tenth of the calls (when every method's metric series
exist) and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from specdec.access import bearer_metadata, new_token
from specdec.launcher import LaunchOptions, launch
from specdec.prefix import CommittedTokens
from specdec.v1 import common_pb2, coordinator_pb2, draft_pb2, target_pb2
from specdec.wire import context_to_pb


def _methods(module, service: str) -> list[tuple[str, bool]]:
    descriptor = module.DESCRIPTOR.services_by_name[service]
    return [(f"/{descriptor.full_name}/{m.name}", m.server_streaming) for m in descriptor.methods]


def _random_text(rng: random.Random, size: int) -> str:
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF)])) for _ in range(size))


def _fuzzed(rng: random.Random, path: str) -> bytes:
    """A well-formed request of the method's type with random field values."""
    session = rng.choice(["", "x" * rng.randrange(1, 200), _random_text(rng, 20), "0" * 36])
    tokens = CommittedTokens(rng.choices(range(-5, 70), k=rng.randrange(0, 12)) if rng.random() < 0.3
                             else rng.choices(range(0, 60), k=rng.randrange(1, 12)))
    sampling = common_pb2.SamplingParams(
        temperature=rng.choice([0.0, 1e-45, 0.7, 1e30, float("nan"), -1.0]), top_k=rng.randrange(-3, 80),
        top_p=rng.choice([0.0, 0.5, 1.0, 2.0]), seed=rng.randrange(2**64), rule=rng.randrange(0, 4))
    context = context_to_pb(session or "s", tokens, rng.randrange(0, len(tokens) + 2) if len(tokens) else 0)
    context.session_id = session
    if rng.random() < 0.3:
        context.prefix_digest = bytes(rng.randrange(256) for _ in range(rng.choice([0, 5, 16])))
    name = path.rsplit("/", 1)[-1]
    if name == "Generate":
        request = coordinator_pb2.GenerateRequest(
            prompt=_random_text(rng, rng.randrange(0, 60)), session_id=session, max_new_tokens=rng.randrange(0, 50),
            temperature=sampling.temperature, top_k=sampling.top_k, k=rng.randrange(-2, 40),
            stop=[_random_text(rng, 3)], resume=rng.random() < 0.1, sampling_rule=rng.randrange(0, 4))
    elif name in ("GetSession", "DeleteSession", "Release"):
        request = {"GetSession": coordinator_pb2.GetSessionRequest, "DeleteSession": coordinator_pb2.DeleteSessionRequest,
                   "Release": common_pb2.ReleaseRequest}[name](session_id=session)
    elif name == "Verify":
        request = target_pb2.VerifyRequest(context=context, draft_tokens=rng.choices(range(-2, 70), k=rng.randrange(6)),
                                           sampling=sampling)
    elif name == "Propose":
        request = draft_pb2.ProposeRequest(context=context, k=rng.randrange(0, 40), sampling=sampling)
    else:
        request = common_pb2.GetInfoRequest()
    return request.SerializeToString()


async def call_raw(channel, path: str, streaming: bool, payload: bytes, metadata=None,
                   timeout_s: float = 30.0) -> grpc.StatusCode:
    """Send raw request bytes to a method (streaming or not); the status it ends with. Every error
    message must stay short, whatever was sent."""
    identity = dict(request_serializer=None, response_deserializer=None)
    try:
        if streaming:
            async for _ in channel.unary_stream(path, **identity)(payload, timeout=timeout_s, metadata=metadata):
                pass
        else:
            await channel.unary_unary(path, **identity)(payload, timeout=timeout_s, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        assert len(err.details() or "") <= 1000, f"{path} answered a {len(err.details())}-character message"
        return err.code()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _footprint(pipeline, redis) -> dict:
    import urllib.request

    pages = {}
    for name, child in [("coordinator", pipeline.coordinator), ("target", pipeline.targets[0]),
                        ("draft", pipeline.drafts[0])]:
        pages[name] = {"metrics_bytes": len(urllib.request.urlopen(f"http://{child.metrics}/metrics", timeout=5).read()),
                       "rss_mib": round(_rss_kib(child.pid) / 1024, 1)}
    info = await redis.info("memory")
    return {"services": pages, "redis_used_mib": round(info["used_memory"] / 2**20, 2), "redis_keys": await redis.dbsize()}


async def run(calls: int, target: str, seed: int) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="specdec-hostile-") as tmp:
        token_file = Path(tmp) / "tier-token"
        token = new_token()
        token_file.write_text(token)
        if target == "tiny":
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from tiny_models import build_tiny_model

            target = str(build_tiny_model(Path(tmp) / "tiny", seed=0, logit_scale=8.0))
        pipeline = await launch(LaunchOptions(target=target, draft="ngram", torch_threads=1,
                                              tier_token_file=str(token_file)))
        redis = aioredis.from_url(pipeline.redis_url)
        try:
            addresses = {"coordinator": pipeline.coordinator.address, "target": pipeline.targets[0].address,
                         "draft": pipeline.drafts[0].address}
            methods = {"coordinator": _methods(coordinator_pb2, "Coordinator"),
                       "target": _methods(target_pb2, "TargetService"), "draft": _methods(draft_pb2, "DraftService")}
            channels = {name: grpc.aio.insecure_channel(a, options=[("grpc.max_send_message_length", 1 << 26)])
                        for name, a in addresses.items()}
            before = await _footprint(pipeline, redis)
            warmed = None
            codes: Counter = Counter()
            kinds: Counter = Counter()
            started = time.perf_counter()
            for i in range(calls):
                if i == calls // 10:  # every method has been called: its metric series exist now
                    warmed = await _footprint(pipeline, redis)
                service = ("coordinator", "target", "draft")[i % 3]
                path, streaming = rng.choice(methods[service])
                metadata = bearer_metadata(token) if service != "coordinator" else None
                kind = rng.choice(["undecodable", "random bytes", "fuzzed", "fuzzed", "no token", "unknown method",
                                   "huge id"])
                if kind == "undecodable":
                    payload = rng.choice([b"\x0a\x02\xff\xfe", b"\x12\x7f", b"\x00", b"\x08\xff\xff\xff"])
                elif kind == "random bytes":
                    payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
                elif kind == "huge id":
                    payload = coordinator_pb2.GetSessionRequest(session_id="a" * 100_000).SerializeToString()
                else:
                    payload = _fuzzed(rng, path)
                if kind == "no token":
                    metadata = bearer_metadata("guessed") if rng.random() < 0.5 else None
                if kind == "unknown method":
                    path, streaming = f"/specdec.v1.{rng.randrange(10**6)}/M{i}", False
                code = await call_raw(channels[service], path, streaming, payload, metadata)
                codes[code.name] += 1
                kinds[f"{kind} -> {code.name}"] += 1
            wall = time.perf_counter() - started
            after = await _footprint(pipeline, redis)
            for channel in channels.values():
                await channel.close()
        finally:
            await redis.aclose()
            await pipeline.stop()
    return {"calls": calls, "wall_s": round(wall, 1), "codes": dict(codes), "by_kind": dict(sorted(kinds.items())),
            "unknown_or_internal": codes["UNKNOWN"] + codes["INTERNAL"], "before": before,
            "after_first_tenth": warmed, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--target", default="tiny", help="'tiny' (a random 2-layer model) or a model spec")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.calls, args.target, args.seed)), indent=2))


if __name__ == "__main__":
    main()
