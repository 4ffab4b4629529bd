"""The one server interceptor: bearer-token auth, admission, domain errors -> status codes, request metrics.

It wraps the RPCs of the services it is given (PathGuard and KServe); health and reflection pass through
(no token, no admission limit, not in the request metrics), so probes need no secret, do not crowd the
request metrics and stay answerable however many screening calls are open. For each wrapped call it:

1. checks ``authorization: Bearer <token>`` when a token is configured (constant-time compare);
2. refuses a request whose bytes are not the method's protobuf message with INVALID_ARGUMENT (gRPC itself
   would answer UNKNOWN with the parser's exception and log a traceback for every such call);
3. admits at most ``max_active`` calls at once (RESOURCE_EXHAUSTED beyond: an open stream counts for as
   long as it is open), and counts admitted and finished calls (:attr:`active`, :attr:`finished`; the
   drain at shutdown reports them);
4. runs the servicer and maps a raised exception to a status through :func:`service.errors.status_of`
   (anything that is not a :class:`~service.errors.ServiceError` is logged with its traceback, INTERNAL);
5. records ``pathguard_requests_total{method,code}``, the duration histogram and the in-flight gauge.

The wrapped handlers take and give bytes: the message is parsed inside the wrapper (after the token check)
and the answer serialized there, so the duration histogram covers parsing and serialization too. The
wrapped handler of each method is built once and reused (this runs for every call), and the metric children
of each (method, code) are looked up once.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from contextlib import contextmanager

import grpc
from grpc import aio

from . import metrics
from .errors import InvalidInput, Overloaded, Unauthenticated, status_of

log = logging.getLogger(__name__)


def _token_from(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value if isinstance(value, str) else value.decode()).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class _Malformed:
    """Stands in for a request whose bytes did not parse as the method's message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    """``deserializer`` that returns :class:`_Malformed` instead of raising."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError: corrupt wire format, bad UTF-8 in a string field...
            return _Malformed(f"the request is not a well-formed protobuf message ({exc})")
    return deserialize


def _parse(deserializer: Callable[[bytes], object] | None, data: object) -> object:
    """The method's message from its bytes; :class:`InvalidInput` when they are not one."""
    if deserializer is None or not isinstance(data, bytes):
        return data
    try:
        return deserializer(data)
    except Exception as exc:  # DecodeError: corrupt wire format, bad UTF-8 in a string field...
        raise InvalidInput(f"the request is not a well-formed protobuf message ({exc})") from None


async def _parsed_stream(deserializer: Callable[[bytes], object] | None, requests: AsyncIterator) -> AsyncIterator:
    async for data in requests:
        yield _parse(deserializer, data)


def _serializer(serializer: Callable[[object], bytes] | None) -> Callable[[object], object]:
    if serializer is None:
        return lambda message: message

    def _serialize(message: object) -> bytes:  # a frame of its own, for profiles (bench/serve_cost.py)
        return serializer(message)
    return _serialize


class _CallMetrics:
    """The metric children of one method, per status code, looked up once."""

    __slots__ = ("method", "_children")

    def __init__(self, method: str) -> None:
        self.method = method
        self._children: dict[grpc.StatusCode, tuple] = {}

    def record(self, code: grpc.StatusCode, seconds: float) -> None:
        children = self._children.get(code)
        if children is None:
            children = self._children[code] = (
                metrics.REQUESTS.labels(method=self.method, code=code.name),
                metrics.REQUEST_DURATION.labels(method=self.method, code=code.name))
        metrics.INFLIGHT.dec()
        children[0].inc()
        children[1].observe(seconds)


class ServiceInterceptor(aio.ServerInterceptor):
    """See the module docstring. ``max_active`` None: no admission limit."""

    def __init__(self, services: Collection[str], token: str | None = None, max_active: int | None = None) -> None:
        self._services = frozenset(services)
        self._token = token.encode() if token else None
        self._max_active = max_active
        self._wrapped: dict[str, tuple[object, object]] = {}  # method -> (its handler, the wrapped handler)
        self.active = 0  # admitted calls not finished yet
        self.finished = 0  # admitted calls finished, whatever their status

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler, full_method: str):
        service = full_method.lstrip("/").split("/")[0]
        if service not in self._services:
            return self._probe(handler)
        calls = _CallMetrics(full_method.lstrip("/"))
        parse, serialize = handler.request_deserializer, _serializer(handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, calls, parse, serialize))
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.stream_stream, calls, parse, serialize))
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._streaming(handler.unary_stream, calls, parse, serialize))
        return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, calls, parse, serialize))

    @staticmethod
    def _probe(handler):
        """Health and reflection go through as they are, except that a malformed unary request (health
        ``Check``) gets INVALID_ARGUMENT instead of UNKNOWN and a logged traceback."""
        if not handler.unary_unary:
            return handler
        behavior = handler.unary_unary

        async def unary(request, context: aio.ServicerContext):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return await behavior(request, context)
        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=_tolerant(handler.request_deserializer),
                                                   response_serializer=handler.response_serializer)

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        if self._max_active is not None and self.active >= self._max_active:
            raise Overloaded(f"too many concurrent calls (at most {self._max_active}); retry later")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self.finished += 1

    def _authenticate(self, context: aio.ServicerContext) -> None:
        if self._token is None:
            return
        token = _token_from(context.invocation_metadata())
        if token is None:
            raise Unauthenticated("missing bearer token: send metadata `authorization: Bearer <token>`")
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthenticated("invalid bearer token")

    # Metrics are recorded before the status goes out, so that a caller who has its answer also sees it counted.
    def _unary(self, behavior, calls: _CallMetrics, parse, serialize):
        async def wrapper(request, context: aio.ServicerContext):
            metrics.INFLIGHT.inc()
            start = time.perf_counter()
            try:
                self._authenticate(context)
                if hasattr(request, "__aiter__"):
                    request = _parsed_stream(parse, request)
                else:
                    request = _parse(parse, request)
                with self._admitted():
                    response = serialize(await behavior(request, context))
            except BaseException as exc:
                status = self._record_failure(exc, context, calls, start)
                if status is None:
                    raise
                await context.abort(*status)
            calls.record(grpc.StatusCode.OK, time.perf_counter() - start)
            return response
        return wrapper

    def _streaming(self, behavior, calls: _CallMetrics, parse, serialize):
        async def wrapper(request_or_iterator, context: aio.ServicerContext):
            metrics.INFLIGHT.inc()
            start = time.perf_counter()
            try:
                self._authenticate(context)
                if hasattr(request_or_iterator, "__aiter__"):
                    request_or_iterator = _parsed_stream(parse, request_or_iterator)
                else:
                    request_or_iterator = _parse(parse, request_or_iterator)
                with self._admitted():
                    async for response in behavior(request_or_iterator, context):
                        yield serialize(response)
            except BaseException as exc:
                status = self._record_failure(exc, context, calls, start)
                if status is None:
                    raise
                await context.abort(*status)
            calls.record(grpc.StatusCode.OK, time.perf_counter() - start)
        return wrapper

    def _record_failure(self, exc: BaseException, context: aio.ServicerContext, calls: _CallMetrics,
                        start: float) -> tuple[grpc.StatusCode, str] | None:
        """Count a failed call; return the status to abort with, or None to let ``exc`` propagate
        (cancellation, a deadline, an abort already sent)."""
        elapsed = time.perf_counter() - start
        if isinstance(exc, aio.AbortError):
            calls.record(context.code() or grpc.StatusCode.UNKNOWN, elapsed)
            return None
        if not isinstance(exc, Exception):  # CancelledError, GeneratorExit: the caller is gone
            calls.record(self._cancelled_code(context), elapsed)
            return None
        code, message = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed", calls.method, exc_info=exc)
        calls.record(code, elapsed)
        return code, message

    @staticmethod
    def _cancelled_code(context: aio.ServicerContext) -> grpc.StatusCode:
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else \
            grpc.StatusCode.CANCELLED
