"""A hostile client, tried as an outsider would: the tiers serve only coordinators, cached
prefixes are proven rather than trusted, garbage gets a clear client-side answer after
authentication, nothing grows without bound, and odd values (tiny temperatures, enormous ids and
prompts) are handled by documented rules."""

from __future__ import annotations

import asyncio
import logging
import random
import urllib.request

import grpc
import pytest

from bench.hostile import call_raw
from conftest import TIER_METADATA
from coordinator import core as coordinator_core
from helpers import generate
from specdec.prefix import CommittedTokens
from specdec.v1 import (common_pb2, coordinator_pb2, coordinator_pb2_grpc, draft_pb2, draft_pb2_grpc, target_pb2,
                        target_pb2_grpc)
from specdec.wire import context_to_pb

CLIENT_SIDE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED}


def _methods(module, service: str) -> list[tuple[str, bool, bool]]:
    """(path, server-streaming, request has fields) of every method of a service. A request
    without fields (GetInfo's) decodes from anything: its bytes are kept as unknown fields."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    return [(f"/{descriptor.full_name}/{m.name}", m.server_streaming, bool(m.input_type.fields))
            for m in descriptor.methods]


SERVICES = {
    "coordinator": _methods(coordinator_pb2, "Coordinator"),
    "target": _methods(target_pb2, "TargetService"),
    "draft": _methods(draft_pb2, "DraftService"),
}
# Bytes that protobuf cannot decode: a string field holding bytes that are not UTF-8, a length
# running past the end, a field number 0, a truncated varint.
UNDECODABLE = [b"\x0a\x02\xff\xfe", b"\x0a\x7fshort", b"\x00\x01", b"\x08\xff\xff\xff"]


async def test_the_tiers_serve_only_callers_with_the_tier_token(stacks):
    stack = stacks["model"]
    for name, address in (("target", stack.target), ("draft", stack.draft)):
        async with grpc.aio.insecure_channel(address) as channel:
            for path, streaming, _ in SERVICES[name]:
                for metadata in (None, (("authorization", "Bearer guessed-token"),)):
                    code = await call_raw(channel, path, streaming, b"", metadata)
                    assert code == grpc.StatusCode.UNAUTHENTICATED, f"{path} answered {code} to a stranger"
            # Health probes need no token.
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_undecodable_requests_are_invalid_arguments_after_authentication(stacks, caplog):
    stack = stacks["model"]
    caplog.set_level(logging.INFO)
    for name, address, metadata in (("coordinator", stack.coordinator, None), ("target", stack.target, TIER_METADATA),
                                    ("draft", stack.draft, TIER_METADATA)):
        async with grpc.aio.insecure_channel(address) as channel:
            for path, streaming, has_fields in SERVICES[name]:
                for payload in UNDECODABLE:
                    code = await call_raw(channel, path, streaming, payload, metadata)
                    expected = {grpc.StatusCode.INVALID_ARGUMENT} | (set() if has_fields else {grpc.StatusCode.OK})
                    assert code in expected, f"{path} answered {code}"
                    if metadata is not None:
                        assert await call_raw(channel, path, streaming, payload) == grpc.StatusCode.UNAUTHENTICATED
    ours = ("specdec", "coordinator", "draft_service", "target_service")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith(ours)], \
        "garbage must not log errors"


async def test_random_garbage_never_gets_unknown_or_internal(stacks):
    rng = random.Random(5)
    stack = stacks["ngram"]
    codes = []
    for name, address, metadata in (("coordinator", stack.coordinator, None), ("target", stack.target, TIER_METADATA),
                                    ("draft", stack.draft, TIER_METADATA)):
        async with grpc.aio.insecure_channel(address) as channel:
            for path, streaming, _ in SERVICES[name]:
                for _ in range(25):
                    payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
                    codes.append(await call_raw(channel, path, streaming, payload, metadata))
    assert set(codes) <= CLIENT_SIDE | {grpc.StatusCode.OK}, set(codes) - CLIENT_SIDE


async def test_a_poisoned_replica_cache_changes_nothing(stacks):
    """Someone with the tier token replaces the target's and the draft's caches of a running
    session with other tokens: the replicas see the prefix digests no longer match, rebuild,
    and the output is the undisturbed one, greedy and seeded."""
    stack = stacks["model"]
    for fields in (dict(max_new_tokens=60, k=3, ignore_eos=True),
                   dict(max_new_tokens=60, k=3, ignore_eos=True, temperature=0.9, seed=4)):
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            undisturbed = await generate(channel, prompt="the poisoned well", **fields)
            call = coordinator_pb2_grpc.CoordinatorStub(channel).Generate(
                coordinator_pb2.GenerateRequest(prompt="the poisoned well", **fields))
            first = await call.read()
            tokens = list(first.token_ids)
            garbage = CommittedTokens(random.Random(1).choices(range(8, 40), k=30))
            context = context_to_pb(first.session_id, garbage, 0)
            poisoned = 0
            while (message := await call.read()) != grpc.aio.EOF:
                tokens += message.token_ids
                if poisoned < 3:
                    async with grpc.aio.insecure_channel(stack.target) as target, \
                            grpc.aio.insecure_channel(stack.draft) as draft:
                        await target_pb2_grpc.TargetServiceStub(target).Verify(
                            target_pb2.VerifyRequest(context=context, draft_tokens=[9, 9]), metadata=TIER_METADATA)
                        await draft_pb2_grpc.DraftServiceStub(draft).Propose(
                            draft_pb2.ProposeRequest(context=context, k=2), metadata=TIER_METADATA)
                    poisoned += 1
        assert poisoned == 3
        assert tokens == undisturbed.token_ids


async def test_a_replica_never_reveals_or_continues_a_prefix_it_cannot_prove(stacks):
    """Knowing only a session id, a caller asks the draft replica to continue the session from a
    large committed_len: it gets a bare cache miss, neither the count of tokens held nor a draft."""
    stack = stacks["model"]
    async with grpc.aio.insecure_channel(stack.coordinator) as channel:
        victim = await generate(channel, prompt="my private prompt", max_new_tokens=10, k=3)
    held = len(victim.prompt_token_ids) + len(victim.token_ids)
    guess = CommittedTokens([5] * (held + 1))
    stub = draft_pb2_grpc.DraftServiceStub(grpc.aio.insecure_channel(stack.draft))
    for start in (held, held // 2, 1):
        context = context_to_pb(victim.session_id, guess, start)
        with pytest.raises(grpc.aio.AioRpcError) as miss:
            await stub.Propose(draft_pb2.ProposeRequest(context=context, k=8), metadata=TIER_METADATA)
        assert miss.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert not any(ch.isdigit() for ch in miss.value.details().replace("delta_start=0", ""))


async def test_unknown_methods_add_no_metric_series(redis_server, tiny_target):
    from conftest import start_stack

    stack = await start_stack(redis_server.url, tiny_target, None, metrics_port=0)
    try:
        metrics = f"http://{stack.started[-1].metrics_address}/metrics"
        before = urllib.request.urlopen(metrics, timeout=5).read()
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            for i in range(300):
                assert await call_raw(channel, f"/specdec.v1.Coordinator/Nope{i}", False, b"") == \
                    grpc.StatusCode.UNIMPLEMENTED
                assert await call_raw(channel, f"/x{i}.Y/Z", False, b"") == grpc.StatusCode.UNIMPLEMENTED
        after = urllib.request.urlopen(metrics, timeout=5).read()
        assert b"Nope" not in after and abs(len(after) - len(before)) < 2000
    finally:
        for server in stack.servers:
            await server.stop(0)


async def test_enormous_ids_and_strings_get_short_answers(channels):
    stub = coordinator_pb2_grpc.CoordinatorStub(channels["none"])
    huge = "a" * 100_000
    for call in (lambda: generate(channels["none"], prompt="hi", session_id=huge),
                 lambda: stub.GetSession(coordinator_pb2.GetSessionRequest(session_id=huge)),
                 lambda: stub.DeleteSession(coordinator_pb2.DeleteSessionRequest(session_id=huge))):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(refused.value.details()) < 300 and "aaaa" not in refused.value.details()


async def test_a_temperature_too_small_to_sample_from_is_greedy(channels, stacks):
    greedy = await generate(channels["model"], prompt="cold", max_new_tokens=12, k=2)
    for temperature in (1e-45, 1e-30, 9e-6):
        tiny = await generate(channels["model"], prompt="cold", max_new_tokens=12, k=2, temperature=temperature)
        assert tiny.token_ids == greedy.token_ids
        assert tiny.stats.sampling_rule == "greedy"
    # Straight to the target: ids, no NaN distributions.
    context = context_to_pb("cold-target", CommittedTokens([5, 6, 7]), 0)
    async with grpc.aio.insecure_channel(stacks["model"].target) as channel:
        for rule in (common_pb2.SAMPLING_RULE_REJECTION, common_pb2.SAMPLING_RULE_COUPLED):
            reply = await target_pb2_grpc.TargetServiceStub(channel).Verify(target_pb2.VerifyRequest(
                context=context, draft_tokens=[8], sampling=common_pb2.SamplingParams(temperature=1e-45, rule=rule)),
                metadata=TIER_METADATA)
            assert len(reply.argmax_tokens) == 2 and not reply.HasField("probs")


async def test_a_prompt_too_long_for_the_context_is_refused_without_tokenizing_it(channels, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a prompt that cannot fit must not be tokenized")

    monkeypatch.setattr(coordinator_core, "turn_tokens", never)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await generate(channels["none"], prompt="x " * 500_000)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the model's context is" in refused.value.details()


async def test_tokenizing_a_prompt_does_not_hold_other_streams(channels, monkeypatch):
    """While one prompt is being tokenized (made slow here), another call is served."""
    tokenize = coordinator_core.turn_tokens
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(*args, **kwargs):
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=30)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(coordinator_core, "turn_tokens", slow)
    slow_call = asyncio.create_task(generate(channels["none"], prompt="slow to tokenize", max_new_tokens=2))
    stub = coordinator_pb2_grpc.CoordinatorStub(channels["none"])
    await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as other:  # answered while the first call is still tokenizing
        await stub.GetSession(coordinator_pb2.GetSessionRequest(session_id="unknown"), timeout=10)
    assert other.value.code() == grpc.StatusCode.NOT_FOUND and not slow_call.done()
    release.set()
    assert len((await slow_call).token_ids) == 2
