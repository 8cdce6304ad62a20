"""What the OpenAI-compatible HTTP API adds per request over gRPC.

    python -m bench.http_overhead --requests 30

The same short greedy requests (8 new tokens, raw prompt) to one coordinator through gRPC and
through /v1/completions, whole and streamed, alternating, with the random 2-layer stand-in target
of bench/overhead.py so that model compute stays small. Prints median wall time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc

from bench.overhead import build_stand_in
from specdec.launcher import LaunchOptions, launch
from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc

PROMPT = "Repeat after me: the quick brown fox jumps over the lazy dog."


async def measure(requests: int, new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="specdec-http-") as tmp:
        model = build_stand_in("smollm2", Path(tmp) / "stand-in")
        pipeline = await launch(LaunchOptions(target=str(model), draft="local-ngram"))
        times: dict[str, list[float]] = {"grpc": [], "http": [], "http_stream": []}
        try:
            url = f"http://{pipeline.coordinator.http}/v1/completions"
            body = {"model": "any", "prompt": PROMPT, "max_tokens": new_tokens, "temperature": 0}
            async with grpc.aio.insecure_channel(pipeline.coordinator.address) as channel, \
                    aiohttp.ClientSession() as http:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                async with http.get(f"http://{pipeline.coordinator.http}/v1/models") as reply:
                    body["model"] = (await reply.json())["data"][0]["id"]

                async def via_grpc() -> None:
                    request = coordinator_pb2.GenerateRequest(prompt=PROMPT, raw=True, max_new_tokens=new_tokens)
                    async for _ in stub.Generate(request):
                        pass

                async def via_http(stream: bool) -> None:
                    async with http.post(url, json={**body, "stream": stream}) as reply:
                        reply.raise_for_status()
                        await reply.read()

                runs = {"grpc": via_grpc, "http": lambda: via_http(False), "http_stream": lambda: via_http(True)}
                for i in range(requests + 2):
                    for name, run in runs.items():
                        started = time.perf_counter()
                        await run()
                        if i >= 2:  # warm-up
                            times[name].append(time.perf_counter() - started)
        finally:
            await pipeline.stop()
    report = {name: round(1000 * statistics.median(values), 2) for name, values in times.items()}
    return {"new_tokens": new_tokens, "requests": requests, "median_ms": report,
            "http_minus_grpc_ms": round(report["http"] - report["grpc"], 2),
            "http_stream_minus_grpc_ms": round(report["http_stream"] - report["grpc"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.requests, args.new_tokens)), indent=1))


if __name__ == "__main__":
    main()
