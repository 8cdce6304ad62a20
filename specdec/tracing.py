"""OpenTelemetry spans: a Generate on the coordinator, its Propose and Verify calls, and their
handling on the tiers, under one trace id (the W3C `traceparent` travels in gRPC metadata).

Off unless configured: without a tracer provider the OpenTelemetry API hands out no-op spans and
injects nothing. `--trace-exporter console` prints spans; `otlp` sends them to
`--otlp-endpoint` (needs the PyPI package opentelemetry-exporter-otlp-proto-grpc). Tests install
the SDK's in-memory exporter with `install`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

TRACER = "specdec"


def tracer():
    return trace.get_tracer(TRACER)


def install(service: str, exporter: str = "none", endpoint: str = "", span_exporter=None) -> None:
    """Set the process's tracer provider (once, at start-up)."""
    if exporter == "none" and span_exporter is None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise RuntimeError("--trace-exporter otlp needs: pip install opentelemetry-exporter-otlp-proto-grpc") from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint or None)))
    else:
        raise RuntimeError(f"unknown trace exporter {exporter!r}: none, console or otlp")
    trace.set_tracer_provider(provider)


def with_trace(metadata: Sequence[tuple[str, str]] | None) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata plus the current span's traceparent (nothing added when not tracing)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return tuple(metadata) if metadata else None
    return tuple(metadata or ()) + tuple(carrier.items())


@contextmanager
def server_span(method: str, metadata) -> Iterator[None]:
    """A span for a call this server handles, child of the caller's span when it sent one. It is
    made current for the rest of the handler's task and not detached: a streaming handler may
    be closed from another context, where detaching fails, and the task ends with the call."""
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    span = tracer().start_span(method, context=propagate.extract(carrier), kind=trace.SpanKind.SERVER)
    otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        span.end()


@contextmanager
def client_span(name: str, **attributes) -> Iterator[None]:
    with tracer().start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes):
        yield
