"""Domain errors and the one interceptor that turns them into gRPC status codes.

Domain code raises these plain exceptions; servicers never touch status codes themselves.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import grpc
from grpc import aio

log = logging.getLogger(__name__)


class SpecdecError(Exception):
    """Base class: an error with a message a person can act on and a gRPC status code."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(SpecdecError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SpecdecError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(SpecdecError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(SpecdecError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(SpecdecError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(SpecdecError):
    """A concurrency conflict, e.g. two calls generating in one session at once."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(SpecdecError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SpecdecError):
    code = grpc.StatusCode.PERMISSION_DENIED


class CacheMiss(FailedPrecondition):
    """The service no longer holds the prefix a delta request builds on; resend from 0."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception raised by a handler to (status code, message)."""
    if isinstance(exc, SpecdecError):
        return exc.code, str(exc)
    if isinstance(exc, aio.AioRpcError):
        # A downstream service failed: pass its code on, naming the hop.
        return exc.code(), f"downstream call failed: {exc.details()}"
    try:
        import redis.exceptions as redis_errors

        if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
            return grpc.StatusCode.UNAVAILABLE, f"Redis is unreachable ({exc}); retry when it is back"
    except ImportError:  # pragma: no cover - redis is a dependency
        pass
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def rewrap_handler(
    handler: grpc.RpcMethodHandler | None,
    wrap_unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    wrap_stream: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> grpc.RpcMethodHandler | None:
    """The same handler with its unary or server-streaming behaviour wrapped (what the
    interceptors here do); other kinds pass through."""
    if handler is None:
        return None
    codec = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **codec)
    return handler


class ErrorInterceptor(aio.ServerInterceptor):
    """Catches exceptions from unary and server-streaming handlers and aborts with a status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        return rewrap_handler(
            await continuation(handler_call_details),
            lambda behavior: _wrap_unary(behavior, method),
            lambda behavior: _wrap_stream(behavior, method),
        )


async def _abort(context: aio.ServicerContext, method: str, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=exc)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point is to map every error
            await _abort(context, method, exc)

    return wrapped


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapped(request: Any, context: aio.ServicerContext) -> Any:
        try:
            async for response in behavior(request, context):
                yield response
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, method, exc)

    return wrapped
