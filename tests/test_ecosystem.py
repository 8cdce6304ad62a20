"""The interfaces users reach specdec through: the OpenAI-compatible HTTP API (with the real
`openai` client), the torch-free client, gRPC reflection, health that follows Redis and the
target tier, a drain on SIGTERM, JSON logs, latency histograms, traces, the Grafana dashboard,
the Kubernetes manifests, and DNS resolved off the event loop."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import openai
import pytest
import pytest_asyncio
import yaml

from conftest import REPO, RedisServer, specdec_up, start_stack
from helpers import generate
from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc

PROMPT = "tell me about the sea and the sky"


@pytest_asyncio.fixture(scope="module")
async def http_stack(redis_server, tiny_target):
    stack = await start_stack(redis_server.url, tiny_target, "ngram", http_port=0, metrics_port=0)
    yield stack
    for started in stack.started:
        for cleanup in started.on_stop:
            await cleanup()
        await started.server.stop(0)


def _client(stack, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{stack.started[-1].http_address}/v1", api_key=key, max_retries=0)


async def _grpc_reference(stack, session_id: str) -> list[int]:
    async with grpc.aio.insecure_channel(stack.coordinator) as channel:
        info = await coordinator_pb2_grpc.CoordinatorStub(channel).GetSession(
            coordinator_pb2.GetSessionRequest(session_id=session_id))
    return list(info.token_ids)


async def test_chat_completions_through_the_openai_client_equal_grpc(http_stack):
    async with grpc.aio.insecure_channel(http_stack.coordinator) as channel:
        reference = await generate(channel, prompt=PROMPT, max_new_tokens=24, ignore_eos=True)
    client = _client(http_stack)
    models = await client.models.list()
    model = models.data[0].id
    whole = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == reference.text
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens == len(reference.prompt_token_ids)
    extra = whole.model_extra
    assert extra["spec_decode"]["num_draft_tokens"] >= extra["spec_decode"]["num_accepted_tokens"] >= 0
    stored = await _grpc_reference(http_stack, extra["session_id"])
    assert stored == reference.prompt_token_ids + reference.token_ids  # token for token
    pieces, finish = [], None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True})
    usage = None
    async for event in stream:
        if event.choices:
            pieces.append(event.choices[0].delta.content or "")
            finish = event.choices[0].finish_reason or finish
        if event.usage:
            usage = event.usage
    assert "".join(pieces) == reference.text and finish == "length" and usage.completion_tokens == 24


async def test_a_conversation_with_system_and_assistant_turns_is_rendered_by_the_chat_template(http_stack):
    from coordinator.prompting import messages_tokens

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and then?"}]
    client = _client(http_stack)
    model = (await client.models.list()).data[0].id
    reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0)
    stored = await _grpc_reference(http_stack, reply.model_extra["session_id"])
    expected_prompt = messages_tokens(http_stack.decoder.tokenizer, messages)
    assert stored[: len(expected_prompt)] == expected_prompt


async def test_completions_stream_and_whole_equal_grpc(http_stack):
    async with grpc.aio.insecure_channel(http_stack.coordinator) as channel:
        reference = await generate(channel, prompt="once upon a time", raw=True, max_new_tokens=16, ignore_eos=True)
    client = _client(http_stack)
    model = (await client.models.list()).data[0].id
    whole = await client.completions.create(model=model, prompt="once upon a time", max_tokens=16, temperature=0)
    assert whole.choices[0].text == reference.text
    text = "".join([event.choices[0].text async for event in await client.completions.create(
        model=model, prompt="once upon a time", max_tokens=16, temperature=0, stream=True) if event.choices])
    assert text == reference.text


async def test_sampled_requests_with_seeds_stop_strings_and_logprobs(http_stack):
    client = _client(http_stack)
    model = (await client.models.list()).data[0].id
    for seed in range(20):  # a seed whose answer is long enough to cut with a stop string
        asks = dict(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=20, temperature=0.9,
                    seed=seed)
        one, two = [await client.chat.completions.create(**asks) for _ in range(2)]
        if len(one.choices[0].message.content) >= 10:
            break
    assert one.choices[0].message.content == two.choices[0].message.content  # a seed fixes the answer
    with_logprobs = await client.chat.completions.create(**asks, logprobs=True)
    entries = with_logprobs.choices[0].logprobs.content
    assert entries and all(e.logprob <= 0 for e in entries)
    assert with_logprobs.model_extra["spec_decode"]["sampling_rule"] == "rejection"
    text = one.choices[0].message.content
    stop = text[4:7]
    stopped = await client.chat.completions.create(**asks, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].message.content


async def test_errors_are_shaped_like_openai_errors(http_stack, redis_server, tiny_target):
    client = _client(http_stack)
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert "does not exist" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=(await client.models.list()).data[0].id, messages=[],
                                             max_tokens=5)
    assert "messages" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=(await client.models.list()).data[0].id,
                                             messages=[{"role": "user", "content": "x"}], temperature=0,
                                             logprobs=True)
    guarded = await start_stack(redis_server.url, tiny_target, "ngram", http_port=0, api_keys=("sekrit",),
                                max_active_sessions=0)  # every generation is past the bound
    broken = await start_stack(redis_server.url, tiny_target, "ngram", http_port=0, retry_attempts=1)
    try:
        with pytest.raises(openai.AuthenticationError):
            await _client(guarded, "wrong").models.list()
        allowed = _client(guarded, "sekrit")
        model = (await allowed.models.list()).data[0].id
        with pytest.raises(openai.RateLimitError):
            await allowed.chat.completions.create(model=model, messages=[{"role": "user", "content": "y"}],
                                                  max_tokens=2)
        await broken.servers[0].stop(0)  # the only target replica goes: 503
        with pytest.raises(openai.InternalServerError) as down:
            await _client(broken).chat.completions.create(model=model, messages=[{"role": "user", "content": "z"}],
                                                          max_tokens=2)
        assert down.value.status_code == 503
    finally:
        for stack in (guarded, broken):
            for started in stack.started:
                for cleanup in started.on_stop:
                    await cleanup()
                await started.server.stop(0)


def test_the_client_and_the_cli_import_no_torch():
    code = "import sys, specdec.client, specdec.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


async def test_the_client_generates_resumes_reads_and_deletes(stacks):
    from specdec.client import SpecdecClient

    async with SpecdecClient(stacks["ngram"].coordinator) as client:
        pieces = [p async for p in client.generate("hello", max_new_tokens=8, ignore_eos=True)]
        session_id = pieces[0].session_id
        assert pieces[0].prompt_token_ids and pieces[-1].finish_reason == "length" and pieces[-1].stats
        tokens = [t for p in pieces for t in p.token_ids]
        session = await client.get_session(session_id)
        assert session.token_ids == pieces[0].prompt_token_ids + tokens and session.turns == 1
        with pytest.raises(grpc.aio.AioRpcError) as nothing_to_resume:
            _ = [p async for p in client.resume(session_id, len(tokens))]
        assert nothing_to_resume.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await client.delete_session(session_id) >= 1
        with pytest.raises(grpc.aio.AioRpcError):
            await client.get_session(session_id)


def _reflect(address: str, service: str) -> tuple[list[str], str | None, list[str]]:
    """What a reflection client (grpcurl's way) learns: the services, and a method's input type."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        if service != "specdec.v1.Coordinator":
            return services, None, []
        method = DescriptorPool(database).FindServiceByName(service).FindMethodByName("Generate")
        return services, method.input_type.full_name, list(method.input_type.fields_by_name)


async def test_reflection_lists_the_services_and_resolves_generates_request(stacks):
    for name, address in (("Coordinator", stacks["ngram"].coordinator), ("TargetService", stacks["ngram"].target),
                          ("DraftService", stacks["ngram"].draft)):
        # The servers run on this event loop: the blocking reflection client runs on a thread.
        services, request_type, fields = await asyncio.to_thread(_reflect, address, f"specdec.v1.{name}")
        assert f"specdec.v1.{name}" in services and "grpc.health.v1.Health" in services
        if name == "Coordinator":
            assert request_type == "specdec.v1.GenerateRequest" and "prompt" in fields


async def test_health_follows_redis_and_the_target_tier(tmp_path, tiny_target):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    redis = RedisServer(tmp_path, append_only=True)
    redis.start()
    stack = await start_stack(redis.url, tiny_target, None, health_interval_s=0.2, redis_timeout_s=0.5)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def status_becomes(wanted) -> None:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            for _ in range(100):
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="specdec.v1.Coordinator"))
                if reply.status == wanted:
                    return
                await asyncio.sleep(0.1)
        pytest.fail(f"health never became {wanted}")

    try:
        await status_becomes(serving)
        redis.stop()
        await status_becomes(not_serving)
        redis.start()
        await status_becomes(serving)
        await stack.servers[0].stop(0)  # every target replica
        await status_becomes(not_serving)
    finally:
        for server in stack.servers:
            await server.stop(0)
        redis.stop()


def test_a_long_generate_outlives_sigterm(tiny_target):
    """SIGTERM drains: health turns NOT_SERVING, the stream in flight finishes."""
    with specdec_up("--target", str(tiny_target), "--draft", "ngram", "--torch-threads", "1") as summary:
        channel = grpc.insecure_channel(summary["coordinator"])
        stream = coordinator_pb2_grpc.CoordinatorStub(channel).Generate(
            coordinator_pb2.GenerateRequest(prompt="go on and on", max_new_tokens=200, ignore_eos=True, k=0))
        first = next(stream)
        os.kill(summary["coordinator_pid"], signal.SIGTERM)
        rest = list(stream)
        channel.close()
    assert first.session_id and rest[-1].finish_reason == coordinator_pb2.FINISH_REASON_LENGTH
    assert sum(len(m.token_ids) for m in [first, *rest]) == 200


def test_json_logs_name_the_session(redis_server, tiny_target, tmp_path, tier_token_file):
    target = subprocess.Popen(
        [sys.executable, "-m", "target_service", "--model", str(tiny_target), "--metrics-port", "-1",
         "--tier-token-file", str(tier_token_file)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    address = json.loads(target.stdout.readline())["listening"]
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "--target", address, "--tokenizer", str(tiny_target), "--metrics-port",
         "-1", "--log-format", "json", "--tier-token-file", str(tier_token_file), "--http-port", "-1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SPECDEC_COORDINATOR_REDIS_URL": redis_server.url})
    try:
        listening = json.loads(coordinator.stdout.readline())["listening"]
        channel = grpc.insecure_channel(listening)
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        first = next(stub.Generate(coordinator_pb2.GenerateRequest(prompt="hi", max_new_tokens=2)))
        with pytest.raises(grpc.RpcError):
            list(stub.Generate(coordinator_pb2.GenerateRequest(session_id=first.session_id, prompt="x",
                                                               max_new_tokens=10**6)))
        channel.close()
    finally:
        coordinator.terminate()
        coordinator.wait(30)
        target.terminate()
        target.wait(30)
    lines = [json.loads(line) for line in coordinator.stderr.read().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line.get("session", "").startswith("s:") for line in lines)
    assert not any(first.session_id in json.dumps(line) for line in lines), "ids stay out of logs"


def _metrics(address: str) -> str:
    return urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()


async def test_latency_histograms_counters_and_the_dashboard_on_live_metrics(http_stack):
    await generate(grpc.aio.insecure_channel(http_stack.coordinator), prompt=PROMPT, max_new_tokens=12, k=3)
    from prometheus_client import generate_latest

    # What each server's /metrics page serves (the tiers of this stack have no metrics port).
    pages = "".join(generate_latest(started.metrics.registry).decode() for started in http_stack.started)
    assert _metrics(http_stack.started[-1].metrics_address) in pages
    assert re.search(r"specdec_time_to_first_token_seconds_count\S* [1-9]", pages)
    assert re.search(r"specdec_inter_token_latency_seconds_count\S* [1-9]", pages)
    assert "# TYPE specdec_cache_evictions_total counter" in pages or "# TYPE specdec_cache_evictions counter" in pages
    dashboard = json.loads((REPO / "deploy" / "grafana" / "specdec-dashboard.json").read_text())
    names = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"\bspecdec_[a-z0-9_]+", target["expr"])}
    assert len(names) >= 10
    missing = sorted(name for name in names if name not in pages)
    assert not missing, f"the dashboard asks for metrics no service exports: {missing}"


async def test_one_trace_follows_generate_through_propose_and_verify(redis_server, tiny_target, tiny_draft):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from specdec import tracing

    exporter = InMemorySpanExporter()
    tracing.install("specdec-test", span_exporter=exporter)
    stack = await start_stack(redis_server.url, tiny_target, str(tiny_draft))
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            await generate(channel, prompt=PROMPT, max_new_tokens=6, k=2)
    finally:
        for server in stack.servers:
            await server.stop(0)
    spans = exporter.get_finished_spans()
    generate_span = next(s for s in spans if s.name == "/specdec.v1.Coordinator/Generate")
    trace_id = generate_span.context.trace_id
    in_trace = {s.name for s in spans if s.context.trace_id == trace_id}
    assert {"/specdec.v1.TargetService/Verify", "/specdec.v1.DraftService/Propose", "TargetService",
            "DraftService"} <= in_trace


K8S = REPO / "deploy" / "k8s"


def _manifests() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_kubernetes_manifests_validate_against_the_schemas():
    import kubernetes_validate

    documents = _manifests()
    assert {d["kind"] for d in documents} >= {"Deployment", "Service", "Secret"}
    for document in documents:
        kubernetes_validate.validate(document, "1.30.0", strict=True)


def test_the_kubernetes_manifests_fit_the_code():
    from coordinator.config import CoordinatorConfig
    from draft_service.config import DraftConfig
    from specdec.config import env_name
    from target_service.config import TargetConfig
    import dataclasses

    fields = {prefix: {env_name(prefix, f.name) for f in dataclasses.fields(cls)} for prefix, cls in (
        ("SPECDEC_COORDINATOR_", CoordinatorConfig), ("SPECDEC_TARGET_", TargetConfig), ("SPECDEC_DRAFT_", DraftConfig))}
    deployments = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "Service"}
    for name, tier, service in (("specdec-target", "SPECDEC_TARGET_", "specdec.v1.TargetService"),
                                ("specdec-draft", "SPECDEC_DRAFT_", "specdec.v1.DraftService"),
                                ("specdec-coordinator", "SPECDEC_COORDINATOR_", "specdec.v1.Coordinator")):
        pod = deployments[name]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert set(env) <= fields[tier], f"{name}: {sorted(set(env) - fields[tier])} are no config fields"
        port = int(env[tier + "PORT"]["value"])
        assert container["readinessProbe"]["grpc"] == {"port": port, "service": service}
        assert pod["terminationGracePeriodSeconds"] > float(env[tier + "DRAIN_GRACE_S"]["value"])
        secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in env.values() if "valueFrom" in e}
        assert "tier-token" in secrets
        if name != "specdec-coordinator":
            assert services[name]["spec"]["clusterIP"] == "None"  # headless: one DNS name, every replica
    assert deployments["specdec-target"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == "1"
    coordinator_env = {e["name"]: e for e in deployments["specdec-coordinator"]["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert {"SPECDEC_COORDINATOR_API_KEYS", "SPECDEC_COORDINATOR_REDIS_URL"} <= {
        n for n, e in coordinator_env.items() if "valueFrom" in e}
    assert coordinator_env["SPECDEC_COORDINATOR_TARGET"]["value"].split(":")[0] in services


async def test_dns_is_resolved_off_the_event_loop(monkeypatch):
    from coordinator import clients
    from specdec.v1 import target_pb2_grpc

    replicas = clients.ReplicaSet(["127.0.0.1:1"], target_pb2_grpc.TargetServiceStub, 1.0)
    replicas.configured = ["slow.invalid:50052"]

    def slow_lookup(*args, **kwargs):
        time.sleep(1.0)
        raise socket.gaierror("no such host")

    monkeypatch.setattr(clients.socket, "getaddrinfo", slow_lookup)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await replicas.resolve()
    ticker.cancel()
    await replicas.close()
    assert ticks >= 10, "the event loop stalled while a name was resolved"
    assert replicas.addresses == ["slow.invalid:50052"]
