"""Start the whole pipeline as separate processes: Redis, draft and target replicas, coordinator.

Used by `specdec up` and `specdec demo`. Each service is started with port 0 and announces the
address it bound as one JSON line on stdout; logs go to this process's stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from specdec.access import new_token, read_keys
from specdec.eagle import is_drafter_folder
from specdec.models import AUTO_DRAFTER, DRAFT_IN_TARGET, default_drafter
from specdec.ngram import LOCAL_NGRAM
from specdec.serving import wait_healthy
from specdec.tls import redact_url

START_TIMEOUT_S = 600.0  # the first SmolLM2 load converts its GGUF file


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    address: str = ""
    metrics: str | None = None  # host:port of its Prometheus /metrics
    unix: str | None = None  # unix:PATH, when it also listens on a Unix socket
    http: str | None = None  # host:port of a coordinator's OpenAI-compatible HTTP API

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class LaunchOptions:
    target: str
    draft: str
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    draft_replicas: int = 1
    target_replicas: int = 1
    device: str = "cpu"
    draft_device: str = "cpu"
    default_k: int = 4
    torch_threads: int = 0
    snapshots: bool = True  # draft and target write KV-cache snapshots to Redis
    tier_token_file: str = ""  # the tier token to use; empty: a fresh one for this run
    draft_flags: tuple[str, ...] = ()  # more flags for the draft services
    unix_sockets: bool = True  # the coordinator reaches the tiers over Unix sockets (all run here)
    compile: str = "auto"  # --compile of the target and a model drafter: on, off, auto (on for CUDA)
    batch_invariant: bool = True  # --batch-invariant of the target and a model drafter
    coordinator_flags: tuple[str, ...] = ()  # more flags for the coordinator (e.g. --tree-nodes)
    # The feature drafter hosted by the target replicas (their --drafter; the coordinator's --draft
    # target): each round's drafts made in the Verify before it, no draft tier.
    draft_in_target: bool = False
    # A feature drafter the target replicas host besides (their --drafter), for other coordinators
    # to draft with (specdec bench); with draft_in_target it is `draft` itself.
    target_drafter: str = ""


@dataclass
class Pipeline:
    redis_url: str
    tier_token: str = ""  # the tiers serve only callers that send it (the coordinators)
    coordinator: Child | None = None
    drafts: list[Child] = field(default_factory=list)
    targets: list[Child] = field(default_factory=list)
    extra: list[Child] = field(default_factory=list)  # further services started beside (bench)
    redis_process: asyncio.subprocess.Process | None = None
    redis_dir: str | None = None
    socket_dir: str | None = None

    def summary(self) -> dict:
        return {
            "coordinator": self.coordinator.address if self.coordinator else None,
            "http": self.coordinator.http if self.coordinator else None,
            "redis": redact_url(self.redis_url),
            "draft": [{"address": c.address, "pid": c.pid, "metrics": c.metrics, "unix": c.unix} for c in self.drafts],
            "target": [{"address": c.address, "pid": c.pid, "metrics": c.metrics, "unix": c.unix}
                       for c in self.targets],
            "coordinator_pid": self.coordinator.pid if self.coordinator else None,
            "coordinator_metrics": self.coordinator.metrics if self.coordinator else None,
        }

    def env(self, service: str, snapshots: bool = True) -> dict[str, str]:
        """Secrets for a service of this pipeline, passed in the environment (never on a command
        line): the tier token, and the Redis URL (it may hold a password) for the coordinator and,
        with snapshots, the tiers."""
        prefix = {"target_service": "SPECDEC_TARGET_", "draft_service": "SPECDEC_DRAFT_",
                  "coordinator": "SPECDEC_COORDINATOR_"}[service]
        env = {prefix + "TIER_TOKEN": self.tier_token}
        if service == "coordinator" or snapshots:
            env[prefix + "REDIS_URL"] = self.redis_url
        return env

    async def stop(self) -> None:
        """SIGTERM everything (coordinator first), wait, then SIGKILL what is left."""
        children = self.extra + ([self.coordinator] if self.coordinator else []) + self.drafts + self.targets
        processes = [c.process for c in children] + ([self.redis_process] if self.redis_process else [])
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        for folder in (self.redis_dir, self.socket_dir):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def start_redis(pipeline: Pipeline) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server), or pass --redis-url")
    pipeline.redis_dir = tempfile.mkdtemp(prefix="specdec-redis-")
    port = _free_port("127.0.0.1")
    pipeline.redis_process = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", pipeline.redis_dir, stdout=asyncio.subprocess.DEVNULL,
    )
    pipeline.redis_url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.from_url(pipeline.redis_url)
    deadline = time.monotonic() + 10
    while True:
        try:
            await client.ping()
            break
        except Exception:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start within 10 s")
            await asyncio.sleep(0.05)
    await client.aclose()


# The services' OpenMP runtime (torch's CPU threads), unless the environment says otherwise: after
# a parallel region a thread spins this many times before it sleeps (libgomp's default, 300 000,
# is 15x longer). Tiers that share cores then hand them over sooner: the draft's threads are
# still spinning when the target's Verify starts, and the target's when Propose starts
# (bench/RESULTS.md, "Cheaper proposals" and "Rounds with less waiting"); a step's own parallel
# regions follow each other within microseconds, well inside the spin. The Dockerfile sets the same.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "20000"}


async def spawn_service(
    name: str, module: str, args: list[str], timeout_s: float, env: dict[str, str] | None = None
) -> Child:
    """Start `python -m module args` and wait for its {"listening": ...} line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, stdout=asyncio.subprocess.PIPE,
        env={**OPENMP_DEFAULTS, **os.environ, **(env or {})},
    )
    child = Child(name, process)
    assert process.stdout is not None
    try:
        while True:
            line = await asyncio.wait_for(process.stdout.readline(), timeout_s)
            if not line:
                code = await process.wait()
                raise RuntimeError(f"{name} exited with code {code} before it was ready (its log is above)")
            try:
                announced = json.loads(line)
                child.address, child.metrics = announced["listening"], announced.get("metrics")
                child.unix, child.http = announced.get("unix"), announced.get("http")
                return child
            except (ValueError, KeyError, TypeError):
                sys.stdout.write(line.decode(errors="replace"))
    except asyncio.TimeoutError:
        process.kill()
        raise RuntimeError(f"{name} did not start within {timeout_s:.0f} s") from None


def runner_flags(compile: str, batch_invariant: bool) -> list[str]:
    """The flags of a service that runs a model: how its forward pass is compiled and padded."""
    return ["--compile", compile, "--batch-invariant", str(batch_invariant).lower()]


def drafter_in_target(placement: str, draft: str, target: str) -> bool:
    """Whether the target replicas host the drafter (`--draft-placement`, whose choices the CLI
    checks): 'target' (a feature drafter only), 'tier' never, 'auto' for a feature drafter, whose
    rounds then make one call instead of two and send no features (bench/RESULTS.md, "the feature
    drafter inside the target"); model and n-gram drafters keep their tier. A RuntimeError for a
    drafter the target cannot host."""
    feature = is_drafter_folder(default_drafter(target) if draft == AUTO_DRAFTER else draft)
    if placement == "target" and not feature:
        raise RuntimeError(f"--draft-placement target: only a feature drafter can be hosted by the target, not {draft}")
    return placement == "target" or (placement == "auto" and feature)


async def launch(options: LaunchOptions) -> Pipeline:
    """Start everything and wait until every service is healthy. On failure, stop what started."""
    token = read_keys([], options.tier_token_file)[:1] if options.tier_token_file else [new_token()]
    if not token:
        raise RuntimeError(f"{options.tier_token_file} holds no tier token")
    pipeline = Pipeline(redis_url=options.redis_url or "", tier_token=token[0])
    threads = ["--torch-threads", str(options.torch_threads)]
    try:
        if not options.redis_url:
            await start_redis(pipeline)
        compiling = runner_flags(options.compile, options.batch_invariant)
        target_args = ["--model", options.target, "--host", options.host, "--device", options.device, *threads,
                       *compiling]
        draft = default_drafter(options.target) if options.draft == AUTO_DRAFTER else options.draft
        draft_args = ["--model", draft, "--host", options.host, "--device", options.draft_device, *threads,
                      *compiling, *options.draft_flags]
        target_env = pipeline.env("target_service", options.snapshots)
        draft_env = pipeline.env("draft_service", options.snapshots)
        sockets = tempfile.mkdtemp(prefix="specdec-sockets-") if options.unix_sockets else None
        pipeline.socket_dir = sockets

        def socket(name: str) -> list[str]:
            return ["--unix-socket", os.path.join(sockets, f"{name}.sock")] if sockets else []

        hosted = draft if options.draft_in_target else options.target_drafter
        if hosted:
            target_args += ["--drafter", hosted]
        spawns = [spawn_service(f"target-{i}", "target_service", target_args + socket(f"target-{i}"), START_TIMEOUT_S,
                                target_env) for i in range(options.target_replicas)]
        local = options.draft == LOCAL_NGRAM or options.draft_in_target  # no draft tier
        spawns += [spawn_service(f"draft-{i}", "draft_service", draft_args + socket(f"draft-{i}"), START_TIMEOUT_S,
                                 draft_env) for i in range(0 if local else options.draft_replicas)]
        started = await asyncio.gather(*spawns, return_exceptions=True)  # replicas load models in parallel
        for result in started:
            if isinstance(result, Child):
                (pipeline.targets if result.name.startswith("target") else pipeline.drafts).append(result)
        errors = [r for r in started if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        coordinator_args = [
            "--target", ",".join(c.unix or c.address for c in pipeline.targets),
            "--draft", (DRAFT_IN_TARGET if options.draft_in_target else LOCAL_NGRAM if local
                        else ",".join(c.unix or c.address for c in pipeline.drafts)),
            "--tokenizer", options.target,
            "--host", options.host,
            "--port", str(options.port),
            "--default-k", str(options.default_k),
            *options.coordinator_flags,
        ]
        pipeline.coordinator = await spawn_service("coordinator", "coordinator", coordinator_args, START_TIMEOUT_S,
                                                   env=pipeline.env("coordinator"))
        for child in [pipeline.coordinator, *pipeline.drafts, *pipeline.targets]:
            await wait_healthy(child.address, 60)
        return pipeline
    except BaseException:
        await pipeline.stop()
        raise
