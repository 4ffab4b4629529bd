"""The one server interceptor: bearer-token auth, domain errors -> status codes, request metrics.

It wraps the RPCs of the services it is given (PathGuard and KServe); health and reflection pass through
untouched, so probes need no token and do not crowd the request metrics. For each wrapped call it:

1. checks ``authorization: Bearer <token>`` when a token is configured (constant-time compare);
2. runs the servicer and maps a raised exception to a status through :func:`service.errors.status_of`
   (anything that is not a :class:`~service.errors.ServiceError` is logged with its traceback, INTERNAL);
3. records ``pathguard_requests_total{method,code}``, the duration histogram and the in-flight gauge.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Collection

import grpc
from grpc import aio

from . import metrics
from .errors import Unauthenticated, status_of

log = logging.getLogger(__name__)


def _token_from(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value if isinstance(value, str) else value.decode()).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ServiceInterceptor(aio.ServerInterceptor):
    def __init__(self, services: Collection[str], token: str | None = None) -> None:
        self._services = frozenset(services)
        self._token = token.encode() if token else None

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        service = details.method.lstrip("/").split("/")[0]
        if handler is None or service not in self._services:
            return handler
        method = details.method.lstrip("/")
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method), **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self._streaming(handler.stream_stream, method), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._streaming(handler.unary_stream, method), **kwargs)
        return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method), **kwargs)

    def _authenticate(self, context: aio.ServicerContext) -> None:
        if self._token is None:
            return
        token = _token_from(context.invocation_metadata())
        if token is None:
            raise Unauthenticated("missing bearer token: send metadata `authorization: Bearer <token>`")
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthenticated("invalid bearer token")

    # Metrics are recorded before the status goes out, so that a caller who has its answer also sees it counted.
    def _unary(self, behavior, method: str):
        async def wrapper(request, context: aio.ServicerContext):
            start = self._begin()
            try:
                self._authenticate(context)
                response = await behavior(request, context)
            except BaseException as exc:
                status = self._record_failure(exc, context, method, start)
                if status is None:
                    raise
                await context.abort(*status)
            self._end(method, grpc.StatusCode.OK, start)
            return response
        return wrapper

    def _streaming(self, behavior, method: str):
        async def wrapper(request_or_iterator, context: aio.ServicerContext):
            start = self._begin()
            try:
                self._authenticate(context)
                async for response in behavior(request_or_iterator, context):
                    yield response
            except BaseException as exc:
                status = self._record_failure(exc, context, method, start)
                if status is None:
                    raise
                await context.abort(*status)
            self._end(method, grpc.StatusCode.OK, start)
        return wrapper

    def _record_failure(self, exc: BaseException, context: aio.ServicerContext, method: str,
                        start: float) -> tuple[grpc.StatusCode, str] | None:
        """Count a failed call; return the status to abort with, or None to let ``exc`` propagate
        (cancellation, a deadline, an abort already sent)."""
        if isinstance(exc, aio.AbortError):
            self._end(method, context.code() or grpc.StatusCode.UNKNOWN, start)
            return None
        if not isinstance(exc, Exception):  # CancelledError, GeneratorExit: the caller is gone
            self._end(method, self._cancelled_code(context), start)
            return None
        code, message = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed", method, exc_info=exc)
        self._end(method, code, start)
        return code, message

    @staticmethod
    def _cancelled_code(context: aio.ServicerContext) -> grpc.StatusCode:
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else \
            grpc.StatusCode.CANCELLED

    @staticmethod
    def _begin() -> float:
        metrics.INFLIGHT.inc()
        return time.perf_counter()

    @staticmethod
    def _end(method: str, code: grpc.StatusCode, start: float) -> None:
        metrics.INFLIGHT.dec()
        metrics.REQUESTS.labels(method=method, code=code.name).inc()
        metrics.REQUEST_DURATION.labels(method=method).observe(time.perf_counter() - start)
