"""Why a step inside the target service costs more than the same step alone.

    python -m bench.service_gap --context 400 --drafts 4       # make bench-gap

Times the same work three ways on this machine: the runner's forward alone in this process
(verify of drafts + 1 tokens after a cached context); the same Verify through a real target
service process over gRPC (its own reported compute and the client's wall time per call); and
the service again while a second client keeps its event loop busy with health checks, the
company a serving target has. The gap between the service's compute and the step alone is what
sharing the process with the gRPC server costs the model thread. The step is also timed alone
on a second thread, the first one (which loaded the model) alive beside it: the cause of the gap
this probe found (two OpenMP teams), fixed by loading the model on the thread that runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import statistics
import time

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec import models
from specdec.access import bearer_metadata, new_token
from specdec.kv_cache import SessionCache
from specdec.launcher import spawn_service
from specdec.prefix import CommittedTokens
from specdec.runner import ForwardJob, ModelRunner
from specdec.v1 import target_pb2, target_pb2_grpc
from specdec.wire import context_to_pb


def alone(model: str, tokens: list[int], context: int, drafts: int, reps: int) -> tuple[float, float]:
    """The step alone, all torch work on this thread; then the same steps on a second, lasting
    thread while this one (which loaded the model and has run it) lives on: each thread that runs
    parallel torch operations keeps an OpenMP team of its own, which is what a service that loads
    its model on one thread and runs it on another used to do."""
    runner = ModelRunner(models.load_model(model), len(models.load_tokenizer(model)))
    entry = SessionCache()
    runner.forward([ForwardJob(entry, tokens[:context], context - 1)])

    def step() -> float:
        started = time.perf_counter()
        runner.forward([ForwardJob(entry, tokens[: context + drafts], context - 1)])
        return time.perf_counter() - started

    def median(run) -> float:
        return statistics.median([run() for _ in range(reps + 2)][2:])

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as other:
        return median(step), median(lambda: other.submit(step).result())


async def through_service(model: str, tokens: list[int], context: int, drafts: int, reps: int, busy: bool,
                          extra: list[str]) -> dict:
    token = new_token()
    child = await spawn_service("target", "target_service", ["--model", model, "--metrics-port", "-1", *extra], 600,
                                env={"SPECDEC_TARGET_TIER_TOKEN": token})
    metadata = bearer_metadata(token)
    stop = asyncio.Event()

    async def keep_busy() -> None:
        async with grpc.aio.insecure_channel(child.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                await asyncio.gather(*(stub.Check(health_pb2.HealthCheckRequest()) for _ in range(8)))

    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            stub = target_pb2_grpc.TargetServiceStub(channel)
            committed = CommittedTokens(tokens[:context])
            request = target_pb2.VerifyRequest(context=context_to_pb("gap", committed, 0),
                                               draft_tokens=tokens[context : context + drafts])
            await stub.Verify(request, metadata=metadata)  # prefill
            request.context.CopyFrom(context_to_pb("gap", committed, context))  # nothing new from now on
            noise = asyncio.create_task(keep_busy()) if busy else None
            walls, computes = [], []
            for _ in range(reps + 2):
                started = time.perf_counter()
                reply = await stub.Verify(request, metadata=metadata)
                walls.append(time.perf_counter() - started)
                computes.append(reply.timings.compute_s)
            stop.set()
            if noise is not None:
                await noise
    finally:
        child.process.terminate()
        await child.process.wait()
    return {"compute_ms": round(1000 * statistics.median(computes[2:]), 1),
            "wall_ms": round(1000 * statistics.median(walls[2:]), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--drafts", type=int, default=4)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--service-flags", default="", help="more flags for the target service, e.g. --gil-switch-ms 5")
    args = parser.parse_args()
    vocab = len(models.load_tokenizer(args.model))
    tokens = torch.randint(0, vocab, (args.context + args.drafts,), generator=torch.Generator().manual_seed(0)).tolist()
    extra = args.service_flags.split()
    report = {
        "model": args.model, "context": args.context, "verified_tokens": args.drafts + 1,
        "service_flags": args.service_flags,
        **dict(zip(("alone_ms", "alone_on_a_second_thread_ms"),
                   (round(1000 * t, 1) for t in alone(args.model, tokens, args.context, args.drafts, args.reps)))),
        "service": asyncio.run(through_service(args.model, tokens, args.context, args.drafts, args.reps, False, extra)),
        "service_busy_loop": asyncio.run(through_service(args.model, tokens, args.context, args.drafts, args.reps,
                                                         True, extra)),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
