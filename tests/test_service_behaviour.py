"""Behaviour through real gRPC servers and a real redis-server: seeds, multi-turn, stop
strings, bad input, unknown sessions, a failing draft tier, cache misses, vocabulary checks."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from conftest import TIER_METADATA, start_stack
from coordinator.clients import DeltaTracker
from coordinator.server import StartupError
from helpers import generate
from specdec.prefix import CommittedTokens
from specdec.sampling import SamplingParams
from specdec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, target_pb2_grpc
from tiny_models import build_tiny_model

FINISH = coordinator_pb2.FinishReason


async def test_same_seed_same_tokens(channels):
    kwargs = dict(prompt="once upon a time", max_new_tokens=40, temperature=1.3, top_p=0.95, k=4, ignore_eos=True)
    first = await generate(channels["model"], seed=1234, **kwargs)
    again = await generate(channels["model"], seed=1234, **kwargs)
    other = await generate(channels["model"], seed=4321, **kwargs)
    assert first.session_id != again.session_id
    assert first.token_ids == again.token_ids and len(first.token_ids) == 40
    assert other.token_ids != first.token_ids


async def test_multi_turn_reuses_the_cache_and_stays_exact(channels, target_greedy):
    channel = channels["model"]
    turn1 = await generate(channel, prompt="hello, who are you?", max_new_tokens=20, k=4)
    turn2 = await generate(channel, prompt="and what do you do?", session_id=turn1.session_id, max_new_tokens=20, k=4)
    assert turn2.session_id == turn1.session_id
    history = turn1.prompt_token_ids + turn1.token_ids
    # Only the new turn is prefilled: everything before it comes from the target's cache.
    assert turn2.stats.target_reused_tokens >= len(history) - 1
    assert turn2.stats.target_prefill_tokens <= len(turn2.prompt_token_ids) + 1
    assert turn1.stats.target_prefill_tokens == len(turn1.prompt_token_ids)
    assert turn2.token_ids == target_greedy(history + turn2.prompt_token_ids, 20)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    info = await stub.GetSession(coordinator_pb2.GetSessionRequest(session_id=turn1.session_id))
    assert list(info.token_ids) == history + turn2.prompt_token_ids + turn2.token_ids
    assert info.turns == 2 and info.status == "idle"


async def test_stop_string_ends_generation_and_is_not_returned(channels):
    plain = await generate(channels["ngram"], prompt="write a list", max_new_tokens=40, k=4, ignore_eos=True)
    stop = plain.text[12:15]
    assert len(stop) == 3
    stopped = await generate(channels["ngram"], prompt="write a list", max_new_tokens=40, k=4, ignore_eos=True, stop=[stop])
    assert stopped.finish_reason == FINISH.FINISH_REASON_STOP
    assert stopped.text == plain.text[: plain.text.find(stop)]
    assert stopped.token_ids == plain.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) < len(plain.token_ids)


async def test_finish_reasons_length_and_eos(channels, target_greedy):
    limited = await generate(channels["none"], prompt="count", max_new_tokens=3, k=0, ignore_eos=True)
    assert limited.finish_reason == FINISH.FINISH_REASON_LENGTH and len(limited.token_ids) == 3
    assert limited.stats.draft_tokens == 0 and limited.stats.rounds == 3


BAD_REQUESTS = [
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (dict(prompt="hi", k=-1), grpc.StatusCode.INVALID_ARGUMENT, "k must be in"),
    (dict(prompt="hi", k=1000), grpc.StatusCode.INVALID_ARGUMENT, "k must be in"),
    (dict(prompt="hi", temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0"),
    (dict(prompt="hi", temperature=1.0, top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p must lie in (0, 1]"),
    (dict(prompt="hi", temperature=1.0, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p must lie in (0, 1]"),
    (dict(prompt="hi", max_new_tokens=10**6), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be at most"),
    (dict(prompt="a" * 400), grpc.StatusCode.INVALID_ARGUMENT, "the model's context is 256 tokens"),
    (dict(prompt_token_ids=[1, 10**6]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    (dict(prompt="hi", session_id="no-such-session"), grpc.StatusCode.NOT_FOUND, "does not exist"),
]


@pytest.mark.parametrize("fields,code,message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
async def test_bad_input_is_refused_while_other_sessions_keep_working(channels, target_greedy, fields, code, message):
    channel = channels["model"]
    healthy = asyncio.create_task(generate(channel, prompt="a healthy request", max_new_tokens=24, k=4))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await generate(channel, **fields)
    assert failure.value.code() == code
    assert message in failure.value.details()
    result = await healthy
    assert result.token_ids == target_greedy(result.prompt_token_ids, 24)


async def test_get_session_of_unknown_id_is_not_found(channels):
    stub = coordinator_pb2_grpc.CoordinatorStub(channels["none"])
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetSession(coordinator_pb2.GetSessionRequest(session_id="nope"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_second_generate_on_a_busy_session_is_aborted(channels):
    stub = coordinator_pb2_grpc.CoordinatorStub(channels["none"])
    first = await generate(channels["none"], prompt="start", max_new_tokens=2, k=0)
    long_call = stub.Generate(coordinator_pb2.GenerateRequest(
        prompt="go on", session_id=first.session_id, max_new_tokens=200, ignore_eos=True, k=0))
    await long_call.read()  # the call holds the session now
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await generate(channels["none"], prompt="me too", session_id=first.session_id, max_new_tokens=2)
    assert failure.value.code() == grpc.StatusCode.ABORTED
    assert "already generating" in failure.value.details()
    long_call.cancel()
    # Cancelling frees the session: the next turn goes through.
    for _ in range(50):
        try:
            later = await generate(channels["none"], prompt="after", session_id=first.session_id, max_new_tokens=2)
            break
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.ABORTED
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the session stayed busy after its call was cancelled")
    assert later.session_id == first.session_id


async def test_generation_survives_a_dead_draft_tier(redis_server, tiny_target, tiny_draft, target_greedy):
    stack = await start_stack(redis_server.url, tiny_target, str(tiny_draft), draft_timeout_s=2.0)
    target_server, draft_server, coordinator_server = stack.servers
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            before = await generate(channel, prompt="the draft is up", max_new_tokens=16, k=4, fixed_k=True)
            assert before.stats.draft_fallback_rounds == 0 and before.stats.draft_tokens > 0
            await draft_server.stop(0)
            after = await generate(channel, prompt="the draft is down", max_new_tokens=16, k=4, fixed_k=True)
        assert after.token_ids == target_greedy(after.prompt_token_ids, 16)
        # Every round that wanted a draft ran without one (the last round drafts nothing: k = remaining - 1).
        assert after.stats.draft_fallback_rounds >= after.stats.rounds - 1 > 0
        assert after.stats.draft_tokens == 0
    finally:
        for server in stack.servers:
            await server.stop(0)


async def test_a_replica_that_lost_the_session_is_sent_everything(stacks):
    decoder = stacks["none"].decoder
    target = decoder.target
    address = target.replicas.addresses[0]
    tokens = CommittedTokens([5, 6, 7, 8, 9, 10])
    tracker = DeltaTracker()
    params = SamplingParams()
    first = await target.verify("miss-test", tokens, [], params, tracker, decoder.limits.vocab_size)
    assert tracker.sent[address] == len(tokens)
    await target_pb2_grpc.TargetServiceStub(grpc.aio.insecure_channel(address)).Release(
        common_pb2.ReleaseRequest(session_id="miss-test"), metadata=TIER_METADATA)
    # The tracker believes the replica holds 6 tokens; it does not, answers FAILED_PRECONDITION,
    # and the client resends the whole sequence: same answer, no error.
    tokens.extend([11])
    again = await target.verify("miss-test", tokens, [], params, tracker, decoder.limits.vocab_size)
    fresh = await target.verify("miss-fresh", tokens, [], params, DeltaTracker(), decoder.limits.vocab_size)
    assert again.tokens == fresh.tokens and first.tokens is not None


async def test_a_draft_model_with_another_vocabulary_is_refused(redis_server, tiny_target, tmp_path):
    foreign = build_tiny_model(tmp_path / "foreign", seed=3, chars="xyz0123")
    with pytest.raises(StartupError, match="does not share the target's tokenizer"):
        await start_stack(redis_server.url, tiny_target, str(foreign))


async def test_redis_holds_the_session_with_its_parameters_and_ttl(channels, stacks, redis_server):
    import redis.asyncio as aioredis

    result = await generate(channels["model"], prompt="remember me", max_new_tokens=6, k=2, temperature=0.7,
                            top_k=5, seed=99, stop=["zzz"])
    store = stacks["model"].decoder.store
    record = await store.load(result.session_id)
    assert record.tokens == result.prompt_token_ids + result.token_ids
    assert record.seed == 99 and record.turns == 1 and record.status == "idle"
    assert record.params == {"max_new_tokens": 6, "temperature": pytest.approx(0.7), "top_k": 5, "top_p": 1.0,
                             "seed": 99, "sampling_rule": "coupled", "k": 2, "fixed_k": False, "stop": ["zzz"],
                             "ignore_eos": False}
    assert record.stats["generated_tokens"] == len(result.token_ids)
    client = aioredis.from_url(redis_server.url)
    ttl = await client.ttl(f"specdec:{{{result.session_id}}}:tokens")
    await client.aclose()
    assert 0 < ttl <= 86_400


async def test_session_ids_are_random_hex(stacks):
    store = stacks["none"].decoder.store
    ids = [(await store.create(seed=1)).session_id for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(len(i) == 36 and all(c in "0123456789abcdef" for c in i) for i in ids)
    for session_id in ids:
        await store.delete(session_id)
