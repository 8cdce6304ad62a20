"""What every gRPC server here shares: the model worker thread, health service, error
interceptor, start-up announcement and graceful shutdown on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Protocol, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.access import KeyRing
from specdec.interceptor import ServiceInterceptor
from specdec.metrics import ServiceMetrics
from specdec.tls import open_channel, server_credentials

log = logging.getLogger(__name__)
T = TypeVar("T")

# Large enough for [k+1, 49k-vocab] float32 distributions with room to spare.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class StartupError(RuntimeError):
    """A service cannot start with this configuration; the message says why and what to set."""


@dataclass(frozen=True)
class Timed:
    """A worker result with the time it waited for the worker and the time it ran."""

    value: object
    queue_s: float
    compute_s: float
    batch_sessions: int = 1


class ModelWorker:
    """One thread that owns the model: requests run one at a time, off the event loop.

    torch releases the GIL in its kernels, so the event loop keeps serving RPCs meanwhile. Every
    torch operation of a service belongs on this thread, loading and warm-up included: each thread
    that runs a parallel torch operation gets an OpenMP team of its own, and with two teams on
    this 2-core machine every step of either measured about 18% slower (bench/service_gap.py).
    """

    def __init__(self, name: str):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[[], T]) -> Timed:
        arrived = time.perf_counter()

        def timed() -> Timed:
            started = time.perf_counter()
            value = fn()
            return Timed(value, started - arrived, time.perf_counter() - started)

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    def defer(self, fn: Callable[[], object]) -> None:
        """Run fn on the model thread after what it has been given, without waiting for it (fn
        handles its own errors). A job that needs the model thread but not its caller's wait:
        what follows a reply, such as a KV snapshot's copy."""
        self._executor.submit(fn)

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the model thread and wait for it (start-up: loading the model there)."""
        return self._executor.submit(fn).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def run_inline(fn: Callable[[], T]) -> Timed:
    """Run cheap work on the calling thread, timed like ModelWorker.run."""
    started = time.perf_counter()
    value = fn()
    return Timed(value, 0.0, time.perf_counter() - started)


# The session a line of log is about (its digest, specdec.session_store.log_id), set for the
# duration of a call by whoever handles the session.
current_session: contextvars.ContextVar[str] = contextvars.ContextVar("current_session", default="")


class _SessionField(logging.Filter):
    """Puts the session a record is about on it: as `session` (JSON) and `session_suffix` (text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.session = current_session.get()
        record.session_suffix = f" [{record.session}]" if record.session else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the session when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if getattr(record, "session", ""):
            line["session"] = record.session
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Logs on stderr, as text lines or (fmt "json") one JSON object a line, with the session
    digest on every line about a session."""
    if fmt not in ("text", "json"):
        raise StartupError("--log-format must be text or json")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_SessionField())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s%(session_suffix)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


@dataclass
class Started:
    """A running server: what run_until_signalled needs, and where it listens."""

    server: aio.Server
    health: health.aio.HealthServicer
    address: str
    metrics_address: str | None = None
    unix_address: str | None = None  # unix:PATH, when the service also listens on a Unix socket
    http_address: str | None = None  # host:port of the coordinator's OpenAI-compatible HTTP API
    metrics: ServiceMetrics | None = None
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run after the server stops


class ListenSettings(Protocol):
    """The listening part of every service's config."""

    host: str
    port: int
    metrics_port: int
    tls_cert: str
    tls_key: str
    tls_client_ca: str


async def start_server(
    register: Callable[[aio.Server], None],
    service_names: Iterable[str],
    settings: ListenSettings,
    metrics: ServiceMetrics | None = None,
    keys: KeyRing | None = None,
) -> Started:
    """Create, register and start a server with health checking, TLS when the settings name a
    certificate, callers checked against `keys` (when given and not empty), and /metrics on
    settings.metrics_port (0 = a free port, -1 = none)."""
    host, port, metrics_port = settings.host, settings.port, settings.metrics_port
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    server = aio.server(interceptors=[ServiceInterceptor(metrics, keys)], options=CHANNEL_OPTIONS)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Reflection: grpcurl and friends list the services and resolve their messages.
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    unix_address = None
    if getattr(settings, "unix_socket", ""):
        unix_address = f"unix:{settings.unix_socket}"
        added = (server.add_insecure_port(unix_address) if credentials is None
                 else server.add_secure_port(unix_address, credentials))
        if added == 0:
            raise OSError(f"cannot listen on {unix_address}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_address = metrics.serve(host, metrics_port) if metrics and metrics_port >= 0 else None
    return Started(server, health_servicer, f"{host}:{bound}", metrics_address=metrics_address, metrics=metrics,
                   unix_address=unix_address)


async def run_until_signalled(started: Started, grace_s: float = 30.0) -> None:
    """Announce the address on stdout (one JSON line), then serve until SIGTERM or SIGINT.

    On a signal the health status turns NOT_SERVING first, so balancers stop sending work,
    then in-flight calls get `grace_s` seconds to finish (the drain grace).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announced = {"listening": started.address, "metrics": started.metrics_address}
    if started.unix_address:
        announced["unix"] = started.unix_address
    if started.http_address:
        announced["http"] = started.http_address
    print(json.dumps(announced), flush=True)
    log.info("serving on %s (metrics on %s)", started.address, started.metrics_address)
    await stop.wait()
    log.info("shutting down")
    await started.health.enter_graceful_shutdown()
    await started.server.stop(grace_s)
    for cleanup in started.on_stop:
        await cleanup()


async def wait_healthy(
    address: str, timeout_s: float, service: str = "", credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Poll the standard health service until it answers SERVING or the time runs out."""
    deadline = time.monotonic() + timeout_s
    async with open_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not become healthy within {timeout_s:.0f}s")
            await asyncio.sleep(0.1)
