"""Soak: 8 sessions at a time for SPECDEC_SOAK_S seconds (default 120) while target, draft and
coordinator processes are killed (SIGKILL) and restarted, or hung (SIGSTOP) and let go, at
random. Targets write KV-cache snapshots, so a replica taking over restores them. Every
generation must end with exactly the tokens of an undisturbed run: nothing lost, nothing
repeated."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import grpc

from conftest import TIER_TOKEN, free_port
from helpers import generate
from specdec.launcher import spawn_service
from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc

SOAK_S = float(os.environ.get("SPECDEC_SOAK_S", "120"))
SESSIONS = 8
FIELDS = dict(max_new_tokens=40, k=3, ignore_eos=True)


class Cluster:
    """Real processes on fixed ports, so a killed one comes back at the same address."""

    def __init__(self, redis_url: str, model: str):
        self.redis_url = redis_url
        self.model = model
        self.ports = {name: free_port() for name in ("target-0", "target-1", "draft-0", "draft-1",
                                                     "coordinator-0", "coordinator-1")}
        self.children: dict = {}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    async def start(self, name: str) -> None:
        kind = name.split("-")[0]
        port = ["--port", str(self.ports[name]), "--metrics-port", "-1"]
        env = {}
        if kind == "target":
            args = ["--model", self.model, "--torch-threads", "1", "--snapshot-min-chunk-tokens", "4", *port]
            env = {"SPECDEC_TARGET_REDIS_URL": self.redis_url, "SPECDEC_TARGET_TIER_TOKEN": TIER_TOKEN}
        elif kind == "draft":
            args = ["--model", "ngram", *port]
            env = {"SPECDEC_DRAFT_TIER_TOKEN": TIER_TOKEN}
        else:
            args = ["--target", f"{self.address('target-0')},{self.address('target-1')}",
                    "--draft", f"{self.address('draft-0')},{self.address('draft-1')}",
                    "--tokenizer", self.model, "--draft-timeout-s", "2", "--rpc-timeout-s", "3", *port]
            env = {"SPECDEC_COORDINATOR_REDIS_URL": self.redis_url, "SPECDEC_COORDINATOR_SESSION_LEASE_S": "1",
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
                child.process.kill()
            await child.process.wait()


async def _one_generation(cluster: Cluster, prompt: str) -> tuple[list[int], int]:
    """Generate, resuming on the other coordinator whenever the current one dies."""
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
            request = coordinator_pb2.GenerateRequest(prompt=prompt, **FIELDS)
        try:
            async with grpc.aio.insecure_channel(cluster.address(name)) as channel:
                async for message in coordinator_pb2_grpc.CoordinatorStub(channel).Generate(request, timeout=60):
                    session_id = message.session_id
                    received += message.token_ids
                    if message.HasField("stats"):
                        return received, attempts - 1
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION and session_id:
                # The turn had finished; only its last message was lost. Read the rest from the session.
                async with grpc.aio.insecure_channel(cluster.address(coordinators[(attempts + 1) % 2])) as channel:
                    info = await coordinator_pb2_grpc.CoordinatorStub(channel).GetSession(
                        coordinator_pb2.GetSessionRequest(session_id=session_id))
                return list(info.token_ids)[-FIELDS["max_new_tokens"]:], attempts - 1
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED), err
            await asyncio.sleep(0.2)


async def test_soak_with_random_kills(redis_server, tiny_target, stacks):
    prompts = [f"soak session {i}: count the sheep" for i in range(SESSIONS)]
    async with grpc.aio.insecure_channel(stacks["ngram"].coordinator) as channel:
        expected = {p: (await generate(channel, prompt=p, **FIELDS)).token_ids for p in prompts}
    cluster = Cluster(redis_server.url, str(tiny_target))
    for name in cluster.ports:
        await cluster.start(name)
    deadline = time.monotonic() + SOAK_S
    rng = random.Random(28)  # its first faults kill and hang each kind of process
    faults: list[str] = []
    results = {"generations": 0, "tokens": 0, "mismatches": 0, "retries": 0}

    async def chaos() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            victim = rng.choice(sorted(cluster.ports))
            if rng.random() < 0.3:
                cluster.hang(victim, True)
                faults.append(f"hang {victim}")
                await asyncio.sleep(rng.uniform(0.5, 4.0))  # past the deadlines, sometimes
                cluster.hang(victim, False)
            else:
                cluster.kill(victim)
                faults.append(f"kill {victim}")
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                await cluster.start(victim)  # back on the same port

    async def client(prompt: str) -> None:
        while time.monotonic() < deadline:
            tokens, resumes = await _one_generation(cluster, prompt)
            results["generations"] += 1
            results["tokens"] += len(tokens)
            results["retries"] += resumes
            results["mismatches"] += tokens != expected[prompt]

    try:
        await asyncio.gather(chaos(), *(client(p) for p in prompts))
    finally:
        await cluster.stop()
    print(f"\nsoak: {len(faults)} faults ({', '.join(faults)}), {results}")
    assert results["mismatches"] == 0, results
    assert results["generations"] >= SESSIONS and len(faults) >= 3
