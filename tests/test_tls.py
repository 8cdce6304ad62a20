"""TLS and mutual TLS between all services, with certificates made by openssl for the test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from conftest import TIER_TOKEN
from helpers import generate
from specdec.tls import channel_credentials, redact_url


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: apt-get install openssl (make setup does it)")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=specdec test CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    return d


async def test_every_hop_over_mutual_tls(redis_server, tiny_target, pki):
    from coordinator import server as coordinator_server
    from coordinator.config import CoordinatorConfig
    from draft_service import server as draft_server
    from draft_service.config import DraftConfig
    from target_service import server as target_server
    from target_service.config import TargetConfig

    server_tls = dict(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                      tls_client_ca=str(pki / "ca.pem"))
    target = await target_server.start(TargetConfig(model=str(tiny_target), metrics_port=-1, **server_tls))
    draft = await draft_server.start(DraftConfig(model="ngram", metrics_port=-1, **server_tls))
    config = CoordinatorConfig(
        target=(target.address,), draft=(draft.address,), redis_url=redis_server.url, tokenizer=str(tiny_target),
        startup_timeout_s=10, metrics_port=-1, tier_tls_ca=str(pki / "ca.pem"),
        tier_tls_cert=str(pki / "client.pem"), tier_tls_key=str(pki / "client.key"), **server_tls,
    )
    coordinator = await coordinator_server.start(config)
    client_tls = channel_credentials(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    try:
        async with grpc.aio.secure_channel(coordinator.address, client_tls) as channel:
            result = await generate(channel, prompt="over tls", max_new_tokens=6, k=2, fixed_k=True)
        assert len(result.token_ids) == 6 and result.stats.draft_tokens > 0
        # Plaintext, or TLS without a client certificate, does not get through.
        async with grpc.aio.insecure_channel(coordinator.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await generate(plain, prompt="no tls", max_new_tokens=2)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        no_client_cert = channel_credentials(str(pki / "ca.pem"))
        async with grpc.aio.secure_channel(target.address, no_client_cert) as anonymous:
            from specdec.v1 import common_pb2, target_pb2_grpc

            with pytest.raises(grpc.aio.AioRpcError) as rejected:
                await target_pb2_grpc.TargetServiceStub(anonymous).GetInfo(common_pb2.GetInfoRequest(), timeout=5)
            assert rejected.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for started in (coordinator, draft, target):
            await started.server.stop(0)


async def test_a_coordinator_without_the_tiers_ca_cannot_start(redis_server, tiny_target, pki):
    from coordinator import server as coordinator_server
    from coordinator.config import CoordinatorConfig
    from target_service import server as target_server
    from target_service.config import TargetConfig

    target = await target_server.start(TargetConfig(model=str(tiny_target), metrics_port=-1, tier_token=TIER_TOKEN,
                                                    tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")))
    try:
        config = CoordinatorConfig(target=(target.address,), redis_url=redis_server.url, tokenizer=str(tiny_target),
                                   startup_timeout_s=2, metrics_port=-1)
        with pytest.raises(coordinator_server.StartupError, match="did not answer GetInfo"):
            await coordinator_server.build_decoder(config)
    finally:
        await target.server.stop(0)


def test_secrets_are_redacted_from_urls():
    assert redact_url("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.fixture
def tls_redis(pki, tmp_path):
    """A redis-server that speaks TLS only and wants a password."""
    from conftest import free_port

    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", "s3cret-pw",
         "--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"),
         "--tls-ca-cert-file", str(pki / "ca.pem"), "--tls-auth-clients", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield f"rediss://:s3cret-pw@127.0.0.1:{port}/0?ssl_ca_certs={pki / 'ca.pem'}", port
    process.terminate()
    process.wait(10)


async def test_sessions_and_kv_snapshots_in_a_redis_with_tls_and_a_password(tls_redis, tiny_target, caplog):
    import asyncio

    import redis.asyncio as aioredis

    from conftest import start_stack
    from coordinator import server as coordinator_server
    from coordinator.config import CoordinatorConfig
    from specdec.session_store import snapshot_keys

    url, port = tls_redis
    for _ in range(100):  # redis-server takes a moment to open its TLS port
        try:
            client = aioredis.from_url(url)
            await client.ping()
            break
        except Exception:  # noqa: BLE001
            await client.aclose()
            await asyncio.sleep(0.05)
    stack = await start_stack(url, tiny_target, "ngram")
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            result = await generate(channel, prompt="a session kept behind tls and a password", max_new_tokens=40)
        for _ in range(50):  # the target's snapshot write is in the background
            if await client.hget(snapshot_keys(result.session_id, "target")[1], "len"):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the target wrote no KV snapshot to the TLS Redis")
        # Without TLS, or with a wrong password, the coordinator refuses to start and says why,
        # without printing the password it was given.
        for bad in (f"redis://:s3cret-pw@127.0.0.1:{port}/0", url.replace("s3cret-pw", "wrong-pw")):
            config = CoordinatorConfig(target=(stack.target,), redis_url=bad, tokenizer=str(tiny_target),
                                       metrics_port=-1, startup_timeout_s=5, redis_timeout_s=2)
            with pytest.raises(coordinator_server.StartupError, match="cannot reach Redis") as refused:
                await coordinator_server.build_decoder(config)
            assert "pw" not in str(refused.value)
        assert "s3cret" not in caplog.text
    finally:
        await client.aclose()
        for server in stack.servers:
            await server.stop(0)
