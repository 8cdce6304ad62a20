"""Fixtures: a real redis-server started by the suite, tiny real models, real gRPC servers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import pytest_asyncio
import redis

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The tier token of every test pipeline: the tiers serve only callers that send it.
TIER_TOKEN = "test-tier-token-0123456789"
TIER_METADATA = (("authorization", f"Bearer {TIER_TOKEN}"),)


@pytest.fixture(scope="session")
def tier_token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "tier-token"
    path.write_text(TIER_TOKEN + "\n")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def specdec_up(*args: str, env: dict[str, str] | None = None) -> Iterator[dict]:
    """`specdec up ARGS` as real processes (its own redis-server) with TIER_TOKEN as the tier
    token; yields the summary line it prints (addresses and pids), and stops everything on exit."""
    token_file = Path(tempfile.mkdtemp(prefix="specdec-test-")) / "tier-token"
    token_file.write_text(TIER_TOKEN)
    process = subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", "up", "--tier-token-file", str(token_file), *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env={**os.environ, **(env or {})},
    )
    try:
        yield json.loads(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(30)


class RedisServer:
    """A redis-server process of the suite's own, which tests may stop and restart."""

    def __init__(self, folder: Path, append_only: bool = False):
        self.folder = folder
        self.port = free_port()
        self.append_only = append_only  # AOF: committed sessions survive a restart
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: apt-get install redis-server (make setup does it)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.append_only else "no", "--appendfsync", "always", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "target", seed=0, logit_scale=8.0)


@pytest.fixture(scope="session")
def target_greedy(tiny_target):
    """The tiny target's own greedy continuation (Hugging Face generate), the reference every
    greedy output through the services must equal."""
    import torch

    from specdec import models

    model = models.load_model(str(tiny_target))

    def greedy(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return greedy


@pytest.fixture(scope="session")
def tiny_draft(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "draft", seed=1, logit_scale=8.0)


@dataclass
class Stack:
    """Running services: the coordinator's address and the objects behind it."""

    coordinator: str
    target: str
    draft: str | None
    decoder: object
    servers: list  # targets, drafts, coordinator, in that order
    targets: list = None
    drafts: list = None
    started: list = None  # specdec.serving.Started of each server, same order as servers


# A coordinator --draft that starts no draft service: prompt lookup inside the coordinator, or the
# drafter the targets host.
NO_DRAFT_TIER = ("local-ngram", "target")


async def start_stack(
    redis_url: str, target_model: Path, draft: str | None, target_replicas: int = 1, draft_replicas: int = 1,
    snapshots: bool = True, compile: str = "off", draft_overrides: dict | None = None, hosted_drafter: str = "",
    **coordinator_overrides,
) -> Stack:
    """Start real gRPC servers on loopback in this event loop: target(s), optional draft(s), coordinator.
    With `snapshots` the tiers write KV-cache snapshots to the same Redis, as `specdec up` does;
    `compile` is both tiers' --compile; `draft_overrides`, the draft services' other settings;
    `hosted_drafter`, a feature drafter the targets host (their --drafter; draft "target" has the
    coordinator draft with it)."""
    from coordinator import server as coordinator_server
    from coordinator.config import CoordinatorConfig
    from draft_service import server as draft_server
    from draft_service.config import DraftConfig
    from target_service import server as target_server
    from target_service.config import TargetConfig

    tier_redis = redis_url if snapshots else ""
    tier = dict(metrics_port=-1, redis_url=tier_redis, tier_token=TIER_TOKEN, compile=compile)
    started = [await target_server.start(TargetConfig(model=str(target_model), drafter=hosted_drafter, **tier))
               for _ in range(target_replicas)]
    targets = [s.address for s in started]
    drafts = []
    if draft in NO_DRAFT_TIER:
        drafts.append(draft)
    elif draft is not None:
        for _ in range(draft_replicas):
            started.append(await draft_server.start(DraftConfig(model=draft, **tier, **(draft_overrides or {}))))
            drafts.append(started[-1].address)
    config = CoordinatorConfig(**{
        "target": tuple(targets),
        "draft": tuple(drafts),
        "redis_url": redis_url,
        "tokenizer": str(target_model),
        "startup_timeout_s": 30,
        "metrics_port": -1,
        "tier_token": TIER_TOKEN,
        **coordinator_overrides,
    })
    decoder = await coordinator_server.build_decoder(config)
    started.append(await coordinator_server.start(config, decoder))
    tier_draft = drafts[0] if drafts and draft not in NO_DRAFT_TIER else None
    return Stack(started[-1].address, targets[0], tier_draft, decoder, [s.server for s in started], targets, drafts,
                 started)


@pytest_asyncio.fixture(scope="session")
async def stacks(redis_server, tiny_target, tiny_draft):
    """One running stack per drafter kind: 'model', 'ngram', 'local-ngram' (prompt lookup inside the
    coordinator) and 'none' (target only)."""
    running = {
        "model": await start_stack(redis_server.url, tiny_target, str(tiny_draft)),
        "ngram": await start_stack(redis_server.url, tiny_target, "ngram"),
        "local-ngram": await start_stack(redis_server.url, tiny_target, "local-ngram"),
        "none": await start_stack(redis_server.url, tiny_target, None),
    }
    yield running
    for stack in running.values():
        for server in stack.servers:
            await server.stop(0)


@pytest_asyncio.fixture(scope="session")
async def channels(stacks):
    opened = {name: grpc.aio.insecure_channel(stack.coordinator) for name, stack in stacks.items()}
    yield opened
    for channel in opened.values():
        await channel.close()
