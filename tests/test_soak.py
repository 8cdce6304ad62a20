"""Soak: 8 sessions at a time, half greedy and half seeded sampling (coupled rule, T = 0.8),
while target, draft and coordinator processes are killed (SIGKILL) and restarted or hung
(SIGSTOP) and let go, and Redis is paused or restarted (with AOF), at random. Targets write KV
snapshots, so a replica taking over restores them. Every generation must end with exactly the
tokens of an undisturbed run: nothing lost, nothing repeated, no seeded draw changed.

The suite runs a short version. The long one, at least 100 faults:
    make soak        # = SPECDEC_SOAK_S=420 SPECDEC_SOAK_MIN_FAULTS=100 pytest tests/test_soak.py -s
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import grpc

from conftest import TIER_TOKEN, RedisServer, free_port
from helpers import generate
from specdec.launcher import spawn_service
from specdec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

SOAK_S = float(os.environ.get("SPECDEC_SOAK_S", "30"))  # (the suite: at least MIN_FAULTS faults; 45 s ran 72-127 s)
MIN_FAULTS = int(os.environ.get("SPECDEC_SOAK_MIN_FAULTS", "15"))
SESSIONS = 8
GREEDY = dict(max_new_tokens=40, k=3, ignore_eos=True)
SEEDED = dict(GREEDY, temperature=0.8, seed=7, sampling_rule=common_pb2.SAMPLING_RULE_COUPLED)
PROCESSES = ("target-0", "target-1", "draft-0", "draft-1", "coordinator-0", "coordinator-1")


class Cluster:
    """Real processes on fixed ports, so a killed one comes back at the same address."""

    def __init__(self, redis: RedisServer, model: str):
        self.redis = redis
        self.model = model
        self.ports = {name: free_port() for name in PROCESSES}
        self.children: dict = {}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    async def start(self, name: str) -> None:
        kind = name.split("-")[0]
        port = ["--port", str(self.ports[name]), "--metrics-port", "-1"]
        redis = ["--redis-timeout-s", "1.5"]
        if kind == "target":
            args = ["--model", self.model, "--torch-threads", "1", "--snapshot-min-chunk-tokens", "4", *redis, *port]
            env = {"SPECDEC_TARGET_REDIS_URL": self.redis.url, "SPECDEC_TARGET_TIER_TOKEN": TIER_TOKEN}
        elif kind == "draft":
            args = ["--model", "ngram", *port]
            env = {"SPECDEC_DRAFT_TIER_TOKEN": TIER_TOKEN}
        else:
            args = ["--target", f"{self.address('target-0')},{self.address('target-1')}",
                    "--draft", f"{self.address('draft-0')},{self.address('draft-1')}",
                    "--tokenizer", self.model, "--draft-timeout-s", "2", "--rpc-timeout-s", "3", *redis, *port]
            env = {"SPECDEC_COORDINATOR_REDIS_URL": self.redis.url, "SPECDEC_COORDINATOR_SESSION_LEASE_S": "1",
                   "SPECDEC_COORDINATOR_TIER_TOKEN": TIER_TOKEN}
        module = {"target": "target_service", "draft": "draft_service", "coordinator": "coordinator"}[kind]
        self.children[name] = await spawn_service(name, module, args, 120, env=env)

    def kill(self, name: str) -> None:
        self.children[name].process.send_signal(signal.SIGKILL)

    def hang(self, name: str, hung: bool) -> None:
        self.children[name].process.send_signal(signal.SIGSTOP if hung else signal.SIGCONT)

    async def stop(self) -> None:
        for child in self.children.values():
            if child.process.returncode is None:
                child.process.send_signal(signal.SIGCONT)
                child.process.kill()
            await child.process.wait()


async def _one_generation(cluster: Cluster, prompt: str, fields: dict) -> tuple[list[int], int]:
    """Generate, resuming on the other coordinator whenever a call fails (a coordinator, a
    replica or Redis went away): the turn stays open until it finishes."""
    coordinators = ["coordinator-0", "coordinator-1"]
    received: list[int] = []
    session_id = ""
    attempts = 0
    while True:
        attempts += 1
        name = coordinators[attempts % 2]
        if session_id:
            request = coordinator_pb2.GenerateRequest(session_id=session_id, resume=True, resume_from=len(received))
        else:
            request = coordinator_pb2.GenerateRequest(prompt=prompt, **fields)
        try:
            async with grpc.aio.insecure_channel(cluster.address(name)) as channel:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                async for message in stub.Generate(request, timeout=60):
                    session_id = message.session_id
                    received += message.token_ids
                    if message.HasField("stats"):
                        return received, attempts - 1
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION and session_id:
                # The turn had finished; only its last message was lost. Read the rest from the session.
                try:
                    async with grpc.aio.insecure_channel(cluster.address(coordinators[(attempts + 1) % 2])) as ch:
                        info = await coordinator_pb2_grpc.CoordinatorStub(ch).GetSession(
                            coordinator_pb2.GetSessionRequest(session_id=session_id), timeout=10)
                    return list(info.token_ids)[-fields["max_new_tokens"]:], attempts - 1
                except grpc.aio.AioRpcError:
                    pass
            elif err.code() == grpc.StatusCode.NOT_FOUND and session_id:
                raise AssertionError("a committed session was lost") from err
            else:
                assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                                      grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                                      grpc.StatusCode.DEADLINE_EXCEEDED), err
            await asyncio.sleep(0.2)


async def test_soak_with_random_faults(tmp_path, tiny_target, stacks):
    prompts = {f"soak session {i}: count the sheep": GREEDY if i % 2 else SEEDED for i in range(SESSIONS)}
    async with grpc.aio.insecure_channel(stacks["ngram"].coordinator) as channel:
        expected = {p: (await generate(channel, prompt=p, **fields)).token_ids for p, fields in prompts.items()}
    redis = RedisServer(tmp_path, append_only=True)
    redis.start()
    cluster = Cluster(redis, str(tiny_target))
    for name in PROCESSES:
        await cluster.start(name)
    deadline = time.monotonic() + SOAK_S
    rng = random.Random(28)  # its first faults kill and hang each kind of process
    faults: list[str] = []
    results = {"generations": 0, "tokens": 0, "mismatches": 0, "retries": 0}

    async def fault(victim: str) -> None:
        hang = rng.random() < 0.3
        faults.append(f"{'hang' if hang else 'kill'} {victim}")
        if victim == "redis":
            if hang:
                redis.process.send_signal(signal.SIGSTOP)
                await asyncio.sleep(rng.uniform(0.3, 3.0))  # past the Redis deadlines, sometimes
                redis.process.send_signal(signal.SIGCONT)
            else:
                redis.stop()
                await asyncio.sleep(rng.uniform(0.2, 1.0))
                redis.start()  # same port; the append-only file keeps every commit
        elif hang:
            cluster.hang(victim, True)
            await asyncio.sleep(rng.uniform(0.5, 4.0))  # past the deadlines, sometimes
            cluster.hang(victim, False)
        else:
            cluster.kill(victim)
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            await cluster.start(victim)  # back on the same port

    # Past the deadline, faults go on until MIN_FAULTS were injected (a slow machine restarts its
    # processes slowly), within three times the soak's time.
    last_call = deadline + 2 * SOAK_S
    chaos_done = asyncio.Event()

    async def chaos() -> None:
        """A fault every second or so; two at a time at most, never two on one process."""
        running: dict[str, asyncio.Task] = {}
        while time.monotonic() < deadline or (len(faults) < MIN_FAULTS and time.monotonic() < last_call):
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            running = {name: task for name, task in running.items() if not task.done()}
            victims = [v for v in PROCESSES + ("redis",) if v not in running]
            if len(running) < 2:
                victim = rng.choice(victims)
                running[victim] = asyncio.create_task(fault(victim))
        await asyncio.gather(*running.values())
        chaos_done.set()

    async def client(prompt: str) -> None:
        while not chaos_done.is_set():
            tokens, resumes = await _one_generation(cluster, prompt, prompts[prompt])
            results["generations"] += 1
            results["tokens"] += len(tokens)
            results["retries"] += resumes
            results["mismatches"] += tokens != expected[prompt]

    try:
        await asyncio.gather(chaos(), *(client(p) for p in prompts))
    finally:
        await cluster.stop()
        redis.stop()
    print(f"\nsoak: {len(faults)} faults ({', '.join(faults)}), {results}")
    assert results["mismatches"] == 0, results
    assert results["generations"] >= SESSIONS and len(faults) >= MIN_FAULTS
