"""Property-based fuzzing of every public field through real servers (separate processes):
whatever arrives, the answer is OK or a clear client-side status, never INTERNAL, and the
servers keep serving."""

from __future__ import annotations


import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TIER_METADATA, specdec_up
from specdec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc

ACCEPTABLE = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
}
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
token_ids = st.lists(st.integers(-3, 60), max_size=12)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@pytest.fixture(scope="module")
def services(tiny_target, tiny_draft):
    with specdec_up("--target", str(tiny_target), "--draft", str(tiny_draft), "--torch-threads", "1") as summary:
        channels = {name: grpc.insecure_channel(address) for name, address in [
            ("coordinator", summary["coordinator"]), ("target", summary["target"][0]["address"]),
            ("draft", summary["draft"][0]["address"])]}
        yield channels
        for channel in channels.values():
            channel.close()


def _outcome(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        assert err.code() in ACCEPTABLE, f"{err.code()}: {err.details()}"
        assert err.details(), "an error must say what is wrong"
        return err.code()


def _still_serving(channels) -> None:
    stub = coordinator_pb2_grpc.CoordinatorStub(channels["coordinator"])
    messages = list(stub.Generate(coordinator_pb2.GenerateRequest(prompt="still fine?", max_new_tokens=3), timeout=30))
    assert messages[-1].HasField("stats")


@FUZZ
@given(prompt=text, ids=token_ids, session=st.one_of(st.just(""), text), raw=st.booleans(),
       max_new=st.sampled_from([0, 1, 3, 10**6]), temperature=floats, top_k=st.integers(-5, 100),
       top_p=st.one_of(st.none(), floats), seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       k=st.one_of(st.none(), st.integers(-3, 40)), stop=st.lists(text, max_size=3), ignore_eos=st.booleans())
def test_generate_fields(services, prompt, ids, session, raw, max_new, temperature, top_k, top_p, seed, k, stop,
                         ignore_eos):
    request = coordinator_pb2.GenerateRequest(
        prompt=prompt, prompt_token_ids=ids, session_id=session, raw=raw, max_new_tokens=max_new,
        temperature=temperature, top_k=top_k, stop=stop, ignore_eos=ignore_eos)
    for name, value in (("top_p", top_p), ("seed", seed), ("k", k)):
        if value is not None:
            setattr(request, name, value)
    stub = coordinator_pb2_grpc.CoordinatorStub(services["coordinator"])
    _outcome(lambda: stub.Generate(request, timeout=60))


def _context(draw_session, committed, start, delta):
    return common_pb2.SessionContext(session_id=draw_session, committed_len=committed, delta_start=start,
                                     delta_tokens=delta)


sampling = st.builds(common_pb2.SamplingParams, temperature=floats, top_k=st.integers(-5, 100), top_p=floats,
                     seed=st.integers(0, 2**64 - 1))


@FUZZ
@given(session=text, committed=st.integers(0, 400), start=st.integers(0, 400), delta=token_ids,
       drafts=token_ids, params=sampling)
def test_verify_fields(services, session, committed, start, delta, drafts, params):
    stub = target_pb2_grpc.TargetServiceStub(services["target"])
    request = target_pb2.VerifyRequest(context=_context(session, committed, start, delta), draft_tokens=drafts,
                                       sampling=params)
    _outcome(lambda: stub.Verify(request, timeout=30, metadata=TIER_METADATA))


@FUZZ
@given(session=text, committed=st.integers(0, 400), start=st.integers(0, 400), delta=token_ids,
       k=st.integers(0, 2**32 - 1), params=sampling)
def test_propose_fields(services, session, committed, start, delta, k, params):
    stub = draft_pb2_grpc.DraftServiceStub(services["draft"])
    request = draft_pb2.ProposeRequest(context=_context(session, committed, start, delta), k=k, sampling=params)
    _outcome(lambda: stub.Propose(request, timeout=30, metadata=TIER_METADATA))


@FUZZ
@given(session=st.one_of(text, st.text(alphabet="0123456789abcdef", min_size=36, max_size=36)))
def test_session_id_fields(services, session):
    """GetSession and DeleteSession on the coordinator, Release on both tiers."""
    coordinator = coordinator_pb2_grpc.CoordinatorStub(services["coordinator"])
    _outcome(lambda: coordinator.GetSession(coordinator_pb2.GetSessionRequest(session_id=session), timeout=10))
    _outcome(lambda: coordinator.DeleteSession(coordinator_pb2.DeleteSessionRequest(session_id=session), timeout=10))
    for tier, stub_class in (("target", target_pb2_grpc.TargetServiceStub), ("draft", draft_pb2_grpc.DraftServiceStub)):
        stub = stub_class(services[tier])
        _outcome(lambda: stub.Release(common_pb2.ReleaseRequest(session_id=session), timeout=10,
                                       metadata=TIER_METADATA))


def test_malformed_bytes_and_oversized_messages(services):
    """Bytes that are not a VerifyRequest, and a 70 MB message, are refused cleanly."""
    raw = services["target"].unary_unary("/specdec.v1.TargetService/Verify")
    with pytest.raises(grpc.RpcError) as garbage:
        raw(b"\xff\x00\x13 not a protobuf", timeout=10, metadata=TIER_METADATA)
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    big = coordinator_pb2.GenerateRequest(prompt="x" * (70 * 1024 * 1024))
    stub = coordinator_pb2_grpc.CoordinatorStub(services["coordinator"])
    with pytest.raises(grpc.RpcError) as oversized:
        list(stub.Generate(big, timeout=30))
    assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serving(services)


def test_servers_survive_the_fuzzing(services):
    _still_serving(services)
