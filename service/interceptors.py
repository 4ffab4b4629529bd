"""The one server interceptor: bearer-token auth, admission, domain errors -> status codes, request metrics.

It wraps the RPCs of the services it is given (PathGuard and KServe); health and reflection pass through
(no token, no admission limit, not in the request metrics), so probes need no secret, do not crowd the
request metrics and stay answerable however many screening calls are open. For each wrapped call it:

1. before a byte of the request body is read (in ``intercept_service``, from the call's metadata): checks
   ``authorization: Bearer <token>`` when tokens are configured (constant-time compare; during a rotation
   the token file holds the old and the new token, both valid) and refuses the call when ``max_active``
   calls are already open. A refused call gets a handler that never reads its request: an unauthenticated
   16 MiB message is answered UNAUTHENTICATED without being received or parsed
   (``pathguard_request_bytes_parsed_total`` counts what was parsed);
2. refuses a request whose bytes are not the method's protobuf message with INVALID_ARGUMENT (gRPC itself
   would answer UNKNOWN with the parser's exception and log a traceback for every such call);
3. admits at most ``max_active`` calls at once (RESOURCE_EXHAUSTED beyond: an open stream counts for as
   long as it is open), and counts admitted and finished calls (:attr:`active`, :attr:`finished`; the
   drain at shutdown reports them); each request message is charged to a :class:`RequestBudget` when it
   arrives, before it is parsed, and released when its call ends (a stream's message: when the next one
   arrives): past the budget the call gets RESOURCE_EXHAUSTED and its bytes are dropped unparsed;
4. runs the servicer and maps a raised exception to a status through :func:`service.errors.status_of`
   (anything that is not a :class:`~service.errors.ServiceError` is logged with its traceback, INTERNAL);
5. records ``pathguard_requests_total{method,code}``, the duration histogram and the in-flight gauge.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator
from contextlib import contextmanager

import grpc
from grpc import aio

from . import metrics
from .admission import Charged, RequestBudget, Ticket, releasing
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


class _OverBudget:
    """Stands in for a request refused by the memory budget before it was parsed."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], object] | None, count: bool = False,
              budget: RequestBudget | None = None, ticket: Ticket | None = None) -> Callable[[bytes], object] | None:
    """``deserializer`` that returns :class:`_Malformed` instead of raising, counts the bytes it parses and
    charges them to ``budget`` (:class:`_OverBudget` when they do not fit: dropped unparsed)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> object:
        _ = ticket  # the handler holds this function, this function holds the call's ticket
        charge = None
        if budget is not None:
            charge = budget.charge(len(data))
            if charge is None:
                return _OverBudget(f"the server is at its memory budget for requests in flight "
                                   f"({budget.limit >> 20} MiB); retry later")
        if count:
            metrics.REQUEST_BYTES_PARSED.inc(len(data))
        try:
            message = deserializer(data)
        except Exception as exc:  # DecodeError: corrupt wire format, bad UTF-8 in a string field...
            message = _Malformed(f"the request is not a well-formed protobuf message ({exc})")
        return message if charge is None else Charged(message, budget, charge)
    return deserialize


def _checked(request: object) -> object:
    if isinstance(request, Charged):
        request = request.message
    if isinstance(request, _Malformed):
        raise InvalidInput(request.reason)
    if isinstance(request, _OverBudget):
        raise Overloaded(request.reason)
    return request


async def _checked_stream(requests: AsyncIterator) -> AsyncIterator:
    async for request in requests:
        with releasing(request):  # a stream's message holds its charge until the next one is asked for
            yield _checked(request)


class ServiceInterceptor(aio.ServerInterceptor):
    """See the module docstring. ``max_active`` None: no admission limit."""

    def __init__(self, services: Collection[str], tokens: Iterable[str] = (), max_active: int | None = None,
                 budget: RequestBudget | None = None, max_open: int | None = None) -> None:
        self._services = frozenset(services)
        self.set_tokens(tokens)
        self._max_active = max_active
        self.budget = budget
        # Calls open at once, counted from their metadata (so before their message is received): bounds the
        # memory of messages being received, which the budget only sees once they are complete.
        self._max_open = max_open
        self.open_calls = 0
        self.active = 0  # admitted calls not finished yet
        self.finished = 0  # admitted calls finished, whatever their status

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return handler
        service = details.method.lstrip("/").split("/")[0]
        if service not in self._services:
            return self._probe(handler)
        method = details.method.lstrip("/")
        refusal = self._refusal(details.invocation_metadata)
        if refusal is not None:
            return self._refused(handler, method, *refusal)
        ticket = Ticket(self)
        deserializer = _tolerant(handler.request_deserializer, count=True, budget=self.budget, ticket=ticket)
        kwargs = {"request_deserializer": deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method, ticket), **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self._streaming(handler.stream_stream, method, ticket),
                                                         **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._streaming(handler.unary_stream, method, ticket),
                                                        **kwargs)
        return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method, ticket), **kwargs)

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

    def set_tokens(self, tokens: Iterable[str]) -> None:
        """Accept these bearer tokens from now on (none: no authentication). Calls already admitted go on."""
        self._tokens = tuple(t.encode() for t in tokens if t)

    def _refusal(self, metadata) -> tuple[grpc.StatusCode, str] | None:
        """Why a call must be refused before its request is read (auth, admission), or None."""
        try:
            self._authenticate(metadata)
        except Unauthenticated as exc:
            return exc.code, exc.reason
        if self._max_active is not None and self.active >= self._max_active:
            return Overloaded.code, self._overloaded_message()
        if self._max_open is not None and self.open_calls >= self._max_open:
            return Overloaded.code, f"too many calls arriving at once (at most {self._max_open}); retry later"
        return None

    def _refused(self, handler, method: str, code: grpc.StatusCode, message: str):
        """A handler for ``handler``'s method that answers ``code`` without reading the request: it takes the
        request as a stream and never iterates it, so gRPC never receives or parses the message."""
        def record() -> None:
            metrics.REQUESTS.labels(method=method, code=code.name).inc()
            metrics.REQUEST_DURATION.labels(method=method).observe(0.0)

        kwargs = {"request_deserializer": _tolerant(handler.request_deserializer, count=True),
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary or handler.stream_unary:
            async def refuse(request_iterator, context: aio.ServicerContext):
                record()
                await context.abort(code, message)
            return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)

        async def refuse_stream(request_iterator, context: aio.ServicerContext):
            record()
            await context.abort(code, message)
            yield  # pragma: no cover  (makes this an async generator; abort raised above)
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)

    def _overloaded_message(self) -> str:
        return f"too many concurrent calls (at most {self._max_active}); retry later"

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        if self._max_active is not None and self.active >= self._max_active:
            raise Overloaded(self._overloaded_message())
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self.finished += 1

    def _authenticate(self, metadata) -> None:
        tokens = self._tokens
        if not tokens:
            return
        token = _token_from(metadata)
        if token is None:
            raise Unauthenticated("missing bearer token: send metadata `authorization: Bearer <token>`")
        sent = token.encode()
        # every configured token is compared (no early exit), each in constant time
        if not any([hmac.compare_digest(sent, t) for t in tokens]):
            raise Unauthenticated("invalid bearer token")

    # Metrics are recorded before the status goes out, so that a caller who has its answer also sees it counted.
    def _unary(self, behavior, method: str, ticket: Ticket | None = None):
        async def wrapper(request, context: aio.ServicerContext):
            start = self._begin()
            with releasing(request, ticket):  # the request's budget charge and the open call, when it ends
                try:
                    request = _checked(request)
                    with self._admitted():
                        response = await behavior(request, context)
                except BaseException as exc:
                    await self._fail(exc, context, method, start)
                self._end(method, grpc.StatusCode.OK, start)
                return response
        return wrapper

    def _streaming(self, behavior, method: str, ticket: Ticket | None = None):
        async def wrapper(request_or_iterator, context: aio.ServicerContext):
            start = self._begin()
            # a unary request's charge (a stream's messages: _checked_stream) and the open call, when it ends
            with releasing(request_or_iterator, ticket):
                try:
                    if hasattr(request_or_iterator, "__aiter__"):
                        request_or_iterator = _checked_stream(request_or_iterator)
                    else:
                        request_or_iterator = _checked(request_or_iterator)
                    with self._admitted():
                        async for response in behavior(request_or_iterator, context):
                            yield response
                except BaseException as exc:
                    await self._fail(exc, context, method, start)
                self._end(method, grpc.StatusCode.OK, start)
        return wrapper

    async def _fail(self, exc: BaseException, context: aio.ServicerContext, method: str, start: float) -> None:
        """End a failed call: abort with the status ``exc`` maps to, or re-raise it (cancellation, a deadline,
        an abort already sent). Never returns."""
        status = self._record_failure(exc, context, method, start)
        if status is None:
            raise exc
        await context.abort(*status)

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
