"""Faults: a target replica killed mid-generation, Redis restarted under a running coordinator."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys

import grpc
import pytest

from conftest import REPO, TIER_TOKEN, RedisServer, specdec_up, start_stack
from helpers import generate
from specdec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, target_pb2, target_pb2_grpc


def _tiny_pipeline(tiny_target, *args: str) -> list[str]:
    return ["--target", str(tiny_target), "--draft", "ngram", "--torch-threads", "1", *args]


@pytest.fixture
def two_targets(tiny_target):
    """A fresh pipeline per test: each test kills one of its two target replicas."""
    with specdec_up(*_tiny_pipeline(tiny_target, "--target-replicas", "2")) as summary:
        yield summary


def _home_replica(session_id: str, count: int) -> int:
    """The replica a session goes to first (coordinator.clients.ReplicaSet.order_for)."""
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "little") % count


@pytest.mark.parametrize("temperature", [0.0, 0.9])
async def test_killing_the_sessions_target_replica_changes_nothing(two_targets, stacks, temperature):
    fields = dict(prompt="a long answer please", max_new_tokens=120, k=3, seed=5, ignore_eos=True,
                  temperature=temperature)
    async with grpc.aio.insecure_channel(stacks["ngram"].coordinator) as channel:
        undisturbed = await generate(channel, **fields)
    async with grpc.aio.insecure_channel(two_targets["coordinator"]) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        call = stub.Generate(coordinator_pb2.GenerateRequest(**fields))
        first = await call.read()
        victim = two_targets["target"][_home_replica(first.session_id, 2)]
        os.kill(victim["pid"], signal.SIGKILL)
        tokens = list(first.token_ids)
        last = first
        while (message := await call.read()) != grpc.aio.EOF:
            tokens += message.token_ids
            last = message
    assert tokens == undisturbed.token_ids, "the other replica must produce exactly the same tokens"
    assert last.finish_reason == coordinator_pb2.FINISH_REASON_LENGTH


async def test_redis_restart_fails_cleanly_and_aof_keeps_sessions(tmp_path, tiny_target):
    redis = RedisServer(tmp_path, append_only=True)
    redis.start()
    stack = await start_stack(redis.url, tiny_target, "ngram")
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            before = await generate(channel, prompt="remember this", max_new_tokens=8)
            redis.stop()
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await generate(channel, prompt="redis is down", max_new_tokens=4)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis" in down.value.details()
            redis.start()
            await asyncio.sleep(0.2)
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            info = await stub.GetSession(coordinator_pb2.GetSessionRequest(session_id=before.session_id))
            assert list(info.token_ids) == before.prompt_token_ids + before.token_ids
            again = await generate(channel, prompt="and more", session_id=before.session_id, max_new_tokens=4)
            assert again.session_id == before.session_id
    finally:
        for server in stack.servers:
            await server.stop(0)
        redis.stop()


async def test_the_first_request_after_a_clean_redis_restart_succeeds(tmp_path, tiny_target):
    """The pooled connections died with the old Redis: the client reconnects once instead of
    answering UNAVAILABLE while Redis is up."""
    redis = RedisServer(tmp_path, append_only=True)
    redis.start()
    stack = await start_stack(redis.url, tiny_target, "ngram")
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            before = await generate(channel, prompt="remember this", max_new_tokens=8)
            redis.stop()
            redis.start()
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            info = await stub.GetSession(coordinator_pb2.GetSessionRequest(session_id=before.session_id))
            assert list(info.token_ids) == before.prompt_token_ids + before.token_ids
            redis.stop()
            redis.start()
            again = await generate(channel, prompt="and more", session_id=before.session_id, max_new_tokens=4)
            assert len(again.token_ids) == 4
    finally:
        for server in stack.servers:
            await server.stop(0)
        redis.stop()


async def test_seeded_output_depends_on_neither_k_nor_a_dead_draft_tier(redis_server, tiny_target, tiny_draft, stacks):
    """The coupled rule: the same seed gives the same tokens at k = 0, 2 and 5, with a model or an
    n-gram drafter, and when the draft tier dies mid-generation."""
    fields = dict(prompt="roll the dice", max_new_tokens=60, seed=21, temperature=0.8, ignore_eos=True,
                  sampling_rule=common_pb2.SAMPLING_RULE_COUPLED)
    async with grpc.aio.insecure_channel(stacks["none"].coordinator) as channel:
        reference = await generate(channel, k=0, **fields)
    for drafter in ("model", "ngram"):
        async with grpc.aio.insecure_channel(stacks[drafter].coordinator) as channel:
            for k in (2, 5):
                assert (await generate(channel, k=k, **fields)).token_ids == reference.token_ids, (drafter, k)
    stack = await start_stack(redis_server.url, tiny_target, str(tiny_draft), draft_timeout_s=1.0)
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            call = coordinator_pb2_grpc.CoordinatorStub(channel).Generate(
                coordinator_pb2.GenerateRequest(k=4, **fields))
            tokens = []
            while len(tokens) < 20:
                tokens += (await call.read()).token_ids
            await stack.servers[1].stop(0)  # the only draft replica dies
            while (message := await call.read()) != grpc.aio.EOF:
                tokens += message.token_ids
                last = message
        assert last.stats.draft_fallback_rounds > 0
        assert tokens == reference.token_ids
    finally:
        for server in stack.servers:
            await server.stop(0)


@pytest.fixture
def fast_lease_pipeline(tiny_target):
    env = {"SPECDEC_COORDINATOR_SESSION_LEASE_S": "1"}
    with specdec_up(*_tiny_pipeline(tiny_target), env=env) as summary:
        replacement = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "--target", summary["target"][0]["address"],
             "--draft", summary["draft"][0]["address"], "--tokenizer", str(tiny_target), "--metrics-port", "-1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
            env={**os.environ, **env, "SPECDEC_COORDINATOR_REDIS_URL": summary["redis"],
                 "SPECDEC_COORDINATOR_TIER_TOKEN": TIER_TOKEN},
        )
        summary["replacement"] = json.loads(replacement.stdout.readline())["listening"]
        yield summary
        replacement.terminate()
        replacement.wait(30)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
async def test_a_killed_coordinator_is_resumed_by_another_losing_and_repeating_nothing(
    fast_lease_pipeline, stacks, temperature
):
    fields = dict(prompt="tell me everything", max_new_tokens=150, k=3, seed=11, ignore_eos=True,
                  temperature=temperature)
    async with grpc.aio.insecure_channel(stacks["ngram"].coordinator) as channel:
        undisturbed = await generate(channel, **fields)
    received: list[int] = []
    async with grpc.aio.insecure_channel(fast_lease_pipeline["coordinator"]) as channel:
        call = coordinator_pb2_grpc.CoordinatorStub(channel).Generate(coordinator_pb2.GenerateRequest(**fields))
        for _ in range(3):
            message = await call.read()
            received += message.token_ids
        session_id = message.session_id
        os.kill(fast_lease_pipeline["coordinator_pid"], signal.SIGKILL)
        try:
            while (message := await call.read()) != grpc.aio.EOF:
                received += message.token_ids
        except grpc.aio.AioRpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    assert 0 < len(received) < 150
    async with grpc.aio.insecure_channel(fast_lease_pipeline["replacement"]) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        request = coordinator_pb2.GenerateRequest(session_id=session_id, resume=True, resume_from=len(received))
        for _ in range(50):  # the dead coordinator's lease runs out after 1 s
            try:
                rest = [m async for m in stub.Generate(request)]
                break
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.ABORTED, err.details()
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the session could not be resumed")
    resumed = [t for m in rest for t in m.token_ids]
    assert received + resumed == undisturbed.token_ids, "a token was lost or repeated across the failover"
    assert rest[-1].finish_reason == coordinator_pb2.FINISH_REASON_LENGTH
    again = coordinator_pb2.GenerateRequest(session_id=session_id, resume=True)
    async with grpc.aio.insecure_channel(fast_lease_pipeline["replacement"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as finished:
            _ = [m async for m in coordinator_pb2_grpc.CoordinatorStub(channel).Generate(again)]
    assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
def watched_pipeline(tiny_target):
    """A pipeline whose coordinator gives up on a Propose after 0.5 s and checks health often."""
    env = {"SPECDEC_COORDINATOR_DRAFT_TIMEOUT_S": "0.5", "SPECDEC_COORDINATOR_HEALTH_INTERVAL_S": "0.2"}
    with specdec_up(*_tiny_pipeline(tiny_target), env=env) as summary:
        yield summary
        os.kill(summary["draft"][0]["pid"], signal.SIGCONT)


async def test_a_hung_draft_replica_means_target_only_rounds_until_it_answers_again(watched_pipeline, stacks):
    fields = dict(prompt="abc abc abc abc", max_new_tokens=40, k=3, fixed_k=True, ignore_eos=True)
    async with grpc.aio.insecure_channel(stacks["ngram"].coordinator) as channel:
        undisturbed = await generate(channel, **fields)
    draft_pid = watched_pipeline["draft"][0]["pid"]
    async with grpc.aio.insecure_channel(watched_pipeline["coordinator"]) as channel:
        os.kill(draft_pid, signal.SIGSTOP)  # hung, not dead: its port still accepts connections
        try:
            hung = await generate(channel, **fields)
        finally:
            os.kill(draft_pid, signal.SIGCONT)
        assert hung.token_ids == undisturbed.token_ids
        assert hung.stats.draft_tokens == 0
        # Every round that wanted a draft ran without one (the last drafts nothing: k = remaining - 1).
        assert hung.stats.draft_fallback_rounds >= hung.stats.rounds - 1 > 0
        for _ in range(50):  # the health watch sees the replica serving again within a few checks
            back = await generate(channel, **fields)
            if back.stats.draft_fallback_rounds == 0:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("drafting did not resume after the draft replica answered again")
    assert back.token_ids == undisturbed.token_ids
    assert back.stats.draft_tokens > 0


async def test_verify_retries_with_backoff_until_a_restarted_target_answers(redis_server, tiny_target, stacks):
    from target_service import server as target_server
    from target_service.config import TargetConfig

    fields = dict(prompt="keep going while the target restarts", max_new_tokens=120, k=3, ignore_eos=True)
    async with grpc.aio.insecure_channel(stacks["ngram"].coordinator) as channel:
        undisturbed = await generate(channel, **fields)
    stack = await start_stack(redis_server.url, tiny_target, "ngram", retry_attempts=10, retry_max_backoff_s=0.5)
    host, port = stack.target.rsplit(":", 1)
    replacement = None

    async def restart_later() -> None:
        nonlocal replacement
        await asyncio.sleep(0.5)
        replacement = await target_server.start(
            TargetConfig(model=str(tiny_target), host=host, port=int(port), metrics_port=-1, redis_url=redis_server.url,
                         tier_token=TIER_TOKEN))

    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            call = coordinator_pb2_grpc.CoordinatorStub(channel).Generate(coordinator_pb2.GenerateRequest(**fields))
            tokens = []
            while len(tokens) < 80:  # past the snapshot's first chunks
                tokens += (await call.read()).token_ids
            await stack.servers[0].stop(None)  # the only target replica goes away...
            restarting = asyncio.create_task(restart_later())  # ...and comes back on its address
            while (message := await call.read()) != grpc.aio.EOF:
                tokens += message.token_ids
            await restarting
        assert tokens == undisturbed.token_ids, "the retried rounds must give exactly the same tokens"
        registry = replacement.metrics.registry
        assert registry.get_sample_value("specdec_kv_snapshot_restores_total") == 1
        assert registry.get_sample_value("specdec_kv_snapshot_restored_tokens_total") >= 64
    finally:
        for server in stack.servers + ([replacement.server] if replacement else []):
            await server.stop(0)


@pytest.fixture
def two_targets_short_deadline(tiny_target):
    """Two target replicas; the coordinator gives a Verify 1.5 s before it retries elsewhere."""
    env = {"SPECDEC_COORDINATOR_RPC_TIMEOUT_S": "1.5", "SPECDEC_COORDINATOR_HEALTH_INTERVAL_S": "0.2"}
    with specdec_up(*_tiny_pipeline(tiny_target, "--target-replicas", "2"), env=env) as summary:
        yield summary
        for target in summary["target"]:
            os.kill(target["pid"], signal.SIGCONT)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
async def test_a_hung_target_replica_is_abandoned_at_the_deadline_and_nothing_changes(
    two_targets_short_deadline, stacks, temperature
):
    fields = dict(prompt="a long answer please", max_new_tokens=120, k=3, seed=5, ignore_eos=True,
                  temperature=temperature)
    async with grpc.aio.insecure_channel(stacks["ngram"].coordinator) as channel:
        undisturbed = await generate(channel, **fields)
    async with grpc.aio.insecure_channel(two_targets_short_deadline["coordinator"]) as channel:
        call = coordinator_pb2_grpc.CoordinatorStub(channel).Generate(coordinator_pb2.GenerateRequest(**fields))
        first = await call.read()
        tokens = list(first.token_ids)
        while len(tokens) < 40:
            tokens += (await call.read()).token_ids
        victim = two_targets_short_deadline["target"][_home_replica(first.session_id, 2)]
        os.kill(victim["pid"], signal.SIGSTOP)  # hung, not dead: connections open, no answers
        try:
            while (message := await call.read()) != grpc.aio.EOF:
                tokens += message.token_ids
                last = message
        finally:
            os.kill(victim["pid"], signal.SIGCONT)
    assert tokens == undisturbed.token_ids, "the other replica must produce exactly the same tokens"
    assert last.finish_reason == coordinator_pb2.FINISH_REASON_LENGTH


class _Replica(target_pb2_grpc.TargetServiceServicer):
    """A target replica that answers every Verify, or cancels every one as a stopping server does."""

    def __init__(self, cancels: bool):
        self.cancels, self.calls = cancels, 0

    async def Verify(self, request, context):
        self.calls += 1
        if self.cancels:
            await context.abort(grpc.StatusCode.CANCELLED, "the server is shutting down")
        return target_pb2.VerifyResponse(argmax_tokens=[7])


async def test_a_call_the_replica_cancels_is_retried_on_the_next_one():
    from coordinator.clients import DeltaTracker, ReplicaSet, RetryPolicy
    from specdec.prefix import CommittedTokens

    replicas, servers, addresses = [_Replica(cancels=True), _Replica(cancels=False)], [], []
    for replica in replicas:
        server = grpc.aio.server()
        target_pb2_grpc.add_TargetServiceServicer_to_server(replica, server)
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        servers.append(server)
    session = next(f"s{i}" for i in range(100) if _home_replica(f"s{i}", 2) == 0)  # starts at the cancelling one
    tier = ReplicaSet(addresses, target_pb2_grpc.TargetServiceStub, 5.0, retry=RetryPolicy(attempts=2))
    try:
        reply = await tier.call(session, CommittedTokens([1, 2, 3]), DeltaTracker(),
                                lambda stub, context: stub.Verify(target_pb2.VerifyRequest(context=context)))
    finally:
        await tier.close()
        for server in servers:
            await server.stop(None)
    assert list(reply.argmax_tokens) == [7]
    assert [r.calls for r in replicas] == [1, 1]
    assert tier.healthy[addresses[0]] is False  # tried last until its health watch says otherwise
