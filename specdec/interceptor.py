"""The one server interceptor every service here runs: admit, decode, time, map errors.

For each call to a method the server knows:
  1. the caller's bearer key is checked (when the server has keys), before anything else;
  2. the request bytes are decoded here, not by gRPC, so a message that is not valid protobuf
     (bytes that are not UTF-8 in a string field, say) is INVALID_ARGUMENT, not UNKNOWN with a
     traceback, and only after the caller was admitted;
  3. the handler runs; whatever it raises becomes a status code and a bounded message
     (specdec.errors.status_for); only INTERNAL errors are logged with a traceback;
  4. its duration goes to specdec_rpc_duration_seconds{method}. Unknown methods get no label
     (gRPC answers them UNIMPLEMENTED), so the metric's series stay bounded;
  5. it runs in an OpenTelemetry span, the caller's child when its metadata carries a traceparent
     (a no-op unless tracing is configured, specdec.tracing).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

import grpc
from grpc import aio

from specdec.access import KeyRing, is_open_method
from specdec.errors import InvalidArgument, status_for
from specdec.metrics import ServiceMetrics
from specdec.tracing import server_span

log = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 1000  # an error message never grows with what the client sent


class ServiceInterceptor(aio.ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics | None = None, keys: KeyRing | None = None):
        self.metrics = metrics
        self.keys = keys if keys is not None and keys.enabled else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        call = _Call(
            method,
            None if self.keys is None or is_open_method(method) else self.keys,
            handler.request_deserializer,
            self.metrics.rpc_seconds.labels(method=method.rsplit("/", 1)[-1]) if self.metrics else None,
        )
        codec = dict(request_deserializer=None, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(call.unary(handler.unary_unary), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(call.stream(handler.unary_stream), **codec)
        return handler  # client- and bidi-streaming (reflection): open services, left as they are


class _Call:
    """One method's wrapping: who may call it, how its request is decoded, where it is timed."""

    def __init__(self, method: str, keys: KeyRing | None, deserializer, histogram):
        self.method = method
        self.keys = keys
        self.deserializer = deserializer
        self.histogram = histogram

    def _admit(self, raw: bytes, context: aio.ServicerContext) -> Any:
        if self.keys is not None:
            self.keys.identify(context.invocation_metadata())
        if self.deserializer is None:
            return raw
        try:
            return self.deserializer(raw)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError, and others for odd bytes
            raise InvalidArgument(
                f"the request to {self.method} is not a valid protobuf message (check the client's stubs "
                "and that string fields are UTF-8)"
            ) from None

    def _observe(self, started: float) -> None:
        if self.histogram is not None:
            self.histogram.observe(time.perf_counter() - started)

    def unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def handle(raw: bytes, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            with server_span(self.method, context.invocation_metadata()):
                try:
                    return await behavior(self._admit(raw, context), context)
                except aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the point is to map every error
                    await self._abort(context, exc)
                finally:
                    self._observe(started)

        return handle

    def stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def handle(raw: bytes, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            with server_span(self.method, context.invocation_metadata()):
                try:
                    async for response in behavior(self._admit(raw, context), context):
                        yield response
                except aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    await self._abort(context, exc)
                finally:
                    self._observe(started)

        return handle

    async def _abort(self, context: aio.ServicerContext, exc: BaseException) -> None:
        code, message = status_for(exc)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed", self.method, exc_info=exc)
        else:
            log.info("%s -> %s: %s", self.method, code.name, message)
        await context.abort(code, message)
