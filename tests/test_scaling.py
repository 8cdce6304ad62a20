"""Many sessions at once: batched verification, several replicas per tier, bounds, metrics."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
import pytest_asyncio

from conftest import TIER_TOKEN, start_stack
from coordinator.clients import expand_addresses
from helpers import generate
from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc

PROMPTS = [f"session {i}: tell me about the number {i * 7}" for i in range(16)]


@pytest_asyncio.fixture(scope="module")
async def replicated(redis_server, tiny_target, tiny_draft):
    """2 target and 2 draft replicas (model drafter) behind one coordinator."""
    stack = await start_stack(redis_server.url, tiny_target, str(tiny_draft), target_replicas=2, draft_replicas=2)
    yield stack
    for server in stack.servers:
        await server.stop(0)


async def test_sixteen_concurrent_sessions_equal_their_single_session_output(replicated, stacks):
    async with grpc.aio.insecure_channel(stacks["model"].coordinator) as single:
        alone = [await generate(single, prompt=p, max_new_tokens=24, k=4) for p in PROMPTS]
    async with grpc.aio.insecure_channel(replicated.coordinator) as channel:
        together = await asyncio.gather(*(generate(channel, prompt=p, max_new_tokens=24, k=4) for p in PROMPTS))
    for prompt, a, b in zip(PROMPTS, alone, together):
        assert b.token_ids == a.token_ids, f"{prompt!r} changed under load"
    # Both replicas of each tier carried sessions, and the targets verified sessions in batches.
    target_metrics = [s.metrics for s in replicated.started[:2]]
    draft_metrics = [s.metrics for s in replicated.started[2:4]]
    for tier in (target_metrics, draft_metrics):
        assert all(_count(m.rpc_seconds, "sum") > 0 for m in tier), "a replica was never used"
    batch_counts = [_histogram(m.verify_batch_size) for m in target_metrics]
    assert any(size > 1 for counts in batch_counts for size in counts), batch_counts
    assert _count(replicated.decoder.metrics.rounds) > 0


def _histogram(histogram) -> dict[float, float]:
    """{upper bound: observations in that bucket} of a prometheus Histogram."""
    samples = [s for metric in histogram.collect() for s in metric.samples if s.name.endswith("_bucket")]
    counts, previous = {}, 0.0
    for sample in samples:
        bound = float(sample.labels["le"])
        counts[bound] = sample.value - previous
        previous = sample.value
    return {b: c for b, c in counts.items() if c}


def _count(metric, suffix: str = "total") -> float:
    return sum(s.value for m in metric.collect() for s in m.samples if s.name.endswith(suffix))


async def test_a_replica_down_is_skipped_after_a_health_check(redis_server, tiny_target):
    stack = await start_stack(redis_server.url, tiny_target, "ngram", target_replicas=2)
    try:
        replicas = stack.decoder.target.replicas
        await stack.servers[1].stop(0)  # the second target replica dies
        await replicas.check_health()
        assert replicas.healthy == {stack.targets[0]: True, stack.targets[1]: False}
        assert all(replicas.addresses[replicas.order_for(f"s{i}")[0]] == stack.targets[0] for i in range(20))
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            result = await generate(channel, prompt="still here", max_new_tokens=8, k=2)
        assert len(result.token_ids) == 8
    finally:
        for server in stack.servers:
            await server.stop(0)


async def test_beyond_the_session_bound_requests_are_refused(redis_server, tiny_target):
    stack = await start_stack(redis_server.url, tiny_target, "ngram", max_active_sessions=1)
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            long_call = stub.Generate(coordinator_pb2.GenerateRequest(prompt="go", max_new_tokens=200, ignore_eos=True))
            await long_call.read()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await generate(channel, prompt="me too", max_new_tokens=2)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 1" in refused.value.details()
            while await long_call.read() != grpc.aio.EOF:
                pass
            after = await generate(channel, prompt="now me", max_new_tokens=2)  # the bound frees up
            assert len(after.token_ids) == 2
        assert _count(stack.decoder.metrics.rejected) == 1
    finally:
        for server in stack.servers:
            await server.stop(0)


async def test_evicted_sessions_are_rebuilt_and_stay_exact(redis_server, tiny_target, stacks):
    from target_service import server as target_server
    from target_service.config import TargetConfig

    # Room for about one session's cache: every other session is evicted and rebuilt.
    small = await target_server.start(TargetConfig(model=str(tiny_target), cache_bytes=20_000, metrics_port=0,
                                                   tier_token=TIER_TOKEN))
    stack = await start_stack(redis_server.url, tiny_target, None)
    stack.decoder.target.replicas.configured = [small.address]
    stack.decoder.target.replicas.refresh()
    try:
        async with grpc.aio.insecure_channel(stacks["none"].coordinator) as reference, \
                grpc.aio.insecure_channel(stack.coordinator) as channel:
            for prompt in PROMPTS[:4]:
                want = await generate(reference, prompt=prompt, max_new_tokens=16, k=0)
                got = await generate(channel, prompt=prompt, max_new_tokens=16, k=0)
                assert got.token_ids == want.token_ids
        body = urllib.request.urlopen(f"http://{small.metrics_address}/metrics", timeout=5).read().decode()
        evictions = float(next(line.split()[1] for line in body.splitlines()
                               if line.startswith("specdec_cache_evictions_total ")))
        assert evictions >= 3
        assert "specdec_verify_batch_size_bucket" in body and "specdec_rpc_duration_seconds_count" in body
    finally:
        await small.server.stop(0)
        for server in stack.servers:
            await server.stop(0)


def test_a_dns_name_listing_several_hosts_becomes_several_replicas():
    assert expand_addresses(["127.0.0.1:5000", "[::1]:5001"]) == ["127.0.0.1:5000", "[::1]:5001"]
    # localhost resolves to 127.0.0.1 and ::1 here: two replicas behind one name.
    expanded = expand_addresses(["localhost:5002"])
    assert "127.0.0.1:5002" in expanded or expanded == ["localhost:5002"]
