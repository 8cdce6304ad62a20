"""One fixed workload through a fresh pipeline: A/B runs of a setting or a commit.

    python -m bench.fixed_workload                          # this checkout, the defaults
    GOMP_SPINCOUNT=100000 python -m bench.fixed_workload    # the services with another spin count
    python -m bench.fixed_workload --draft-flags "--torch-threads 1"   # the draft service with one thread

Starts the pipeline as `specdec up` does (the default drafter, trees of 7), then sends the same
prompts one after another (the first N Spec-Bench prompts of the short categories, greedy, a fixed
k, 128 new tokens each, end of text ignored), so two runs do the same rounds and differ only in
how long they take. Prints the wall time, the per-round split the stats report, and the CPU time
each process spent per round (from /proc: on 2 cores the pipeline's processes share the machine,
so a round's wall is about their CPU time over 2). The machine's
speed drifts by several percent over minutes: alternate the runs being compared (A, B, A, B) and
compare their walls, as bench/RESULTS.md does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import grpc

from bench.harness import load_prompts
from specdec.config import default_prompts_file
from specdec.launcher import LaunchOptions, launch
from specdec.models import AUTO_DRAFTER, DEFAULT_MODEL
from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc

LONG_CATEGORIES = ("summarization", "rag", "extraction")  # long prefills: another measurement


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) a live process has used, from /proc; None where there
    is no /proc or the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _processes(pipeline) -> dict[str, int]:
    return {"coordinator": pipeline.coordinator.pid, **({"draft": pipeline.drafts[0].pid} if pipeline.drafts else {}),
            "target": pipeline.targets[0].pid, "redis": pipeline.redis_process.pid, "client": os.getpid()}


async def run(prompts_file: Path, count: int, k: int, max_new_tokens: int, draft_flags: tuple[str, ...] = (),
              draft_in_target: bool = False) -> dict:
    prompts = [p for p in load_prompts(prompts_file, 2, ()) if p.category not in LONG_CATEGORIES][:count]
    pipeline = await launch(LaunchOptions(target=DEFAULT_MODEL, draft=AUTO_DRAFTER, draft_flags=draft_flags,
                                          draft_in_target=draft_in_target))
    try:
        async with grpc.aio.insecure_channel(pipeline.coordinator.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)

            async def generate(text: str, tokens: int) -> coordinator_pb2.GenerationStats:
                request = coordinator_pb2.GenerateRequest(prompt=text, max_new_tokens=tokens, k=k, fixed_k=True,
                                                          ignore_eos=True)
                async for message in stub.Generate(request):
                    if message.HasField("stats"):
                        return message.stats
                raise RuntimeError("the stream ended without stats")

            await generate(prompts[0].text, 8)  # warm-up
            processes = _processes(pipeline)
            cpu_before = {name: cpu_seconds(pid) for name, pid in processes.items()}
            started = time.perf_counter()
            stats = [await generate(p.text, max_new_tokens) for p in prompts]
            wall = time.perf_counter() - started
            cpu_used = {name: cpu_seconds(pid) for name, pid in processes.items()}
    finally:
        await pipeline.stop()
    rounds = sum(s.rounds for s in stats)
    tokens = sum(s.generated_tokens for s in stats)
    verify, draft, total = (sum(getattr(s, name) for s in stats) for name in ("verify_s", "draft_s", "total_s"))
    return {"prompts": len(prompts), "k": k, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "tokens_per_round": round(tokens / rounds, 3),
            "per_round_ms": {"total": round(1000 * total / rounds, 2), "verify": round(1000 * verify / rounds, 2),
                             "draft": round(1000 * draft / rounds, 2),
                             "rest": round(1000 * (total - verify - draft) / rounds, 2)},
            "cpu_ms_per_round": {name: round(1000 * (used - cpu_before[name]) / rounds, 2)
                                 for name, used in cpu_used.items()
                                 if used is not None and cpu_before[name] is not None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=default_prompts_file())
    parser.add_argument("--count", type=int, default=12, help="prompts, from the short categories")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--draft-flags", default="", help="more flags for the draft service, e.g. '--torch-threads 1'")
    parser.add_argument("--draft-in-target", action="store_true", help="the drafter hosted by the target, no draft tier")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.prompts, args.count, args.k, args.max_new_tokens,
                                     tuple(args.draft_flags.split()), args.draft_in_target))))


if __name__ == "__main__":
    main()
