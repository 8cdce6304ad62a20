"""Domain errors and their gRPC status codes.

Domain code raises these plain exceptions; servicers never touch status codes themselves:
specdec.interceptor.ServiceInterceptor turns them into statuses.
"""

from __future__ import annotations

import grpc
from grpc import aio


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
