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

The wrapped handlers take and give bytes: the message is parsed inside the wrapper (after the token check
and admission, and once its bytes are charged to the budget) and the answer serialized there, so the duration
histogram covers parsing and serialization too. The wrapped handler of each method is built once and reused
(this runs for every call): per call only a "deserializer" is swapped in that holds the call's ticket and
charges the message's bytes as they arrive (it does not parse them); the metric children of each
(method, code) are looked up once.
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
from .admission import Charged, RequestBudget, Ticket
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


def _tolerant(deserializer: Callable[[bytes], object] | None, count: bool = False) -> Callable[[bytes], object] | None:
    """``deserializer`` that returns :class:`_Malformed` instead of raising (and counts the bytes it parses)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> object:
        if count:
            metrics.REQUEST_BYTES_PARSED.inc(len(data))
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError: corrupt wire format, bad UTF-8 in a string field...
            return _Malformed(f"the request is not a well-formed protobuf message ({exc})")

    return deserialize


class _Arrived:
    """A request message as it arrived, not parsed yet, with what its call holds: the message's budget charge
    (a :class:`Charged` around its bytes, or :class:`_OverBudget`) and the call's :class:`Ticket`."""

    __slots__ = ("data", "ticket")

    def __init__(self, data: object, ticket: Ticket | None) -> None:
        self.data, self.ticket = data, ticket


def _arrival(budget: RequestBudget | None, ticket: Ticket | None) -> Callable[[bytes], _Arrived]:
    """The per-call "deserializer": charges the message's bytes to ``budget`` as they arrive and hands them on
    unparsed (the shared wrapper parses them, once they are charged and the call is admitted)."""

    def arrive(data: bytes) -> _Arrived:
        if budget is None:
            return _Arrived(data, ticket)
        charge = budget.charge(len(data))
        if charge is None:
            return _Arrived(
                _OverBudget(
                    f"the server is at its memory budget for requests in flight ({budget.limit >> 20} MiB); retry later"
                ),
                ticket,
            )
        return _Arrived(Charged(data, budget, charge), ticket)

    return arrive


def _release(request: object) -> None:
    """Give back the budget charge of an arrived message (the call's ticket stays with its call)."""
    if isinstance(request, _Arrived) and isinstance(request.data, Charged):
        request.data.release()


def _prepared(parse: Callable[[bytes], object] | None, request: object, held: list) -> object:
    """The request as the servicer takes it: the parsed message, or a stream that parses each one. What the
    call holds (the message's charge, the call's ticket) goes to ``held``, released when the call ends."""
    if hasattr(request, "__aiter__"):
        return _parsed_stream(parse, request, held)
    held.append(request)
    return _parse(parse, request)


def _release_all(held: list) -> None:
    for item in held:
        if isinstance(item, _Arrived):
            _release(item)
            item = item.ticket
        if isinstance(item, Ticket):
            item.release()


def _parse(deserializer: Callable[[bytes], object] | None, data: object) -> object:
    """The method's message from its bytes (counted in ``pathguard_request_bytes_parsed_total``);
    :class:`InvalidInput` when they are not one, :class:`Overloaded` when the budget refused them."""
    if isinstance(data, _Arrived):
        data = data.data
    if isinstance(data, Charged):
        data = data.message
    if isinstance(data, _OverBudget):
        raise Overloaded(data.reason)
    if deserializer is None or not isinstance(data, bytes):
        return data
    metrics.REQUEST_BYTES_PARSED.inc(len(data))
    try:
        return deserializer(data)
    except Exception as exc:  # DecodeError: corrupt wire format, bad UTF-8 in a string field...
        raise InvalidInput(f"the request is not a well-formed protobuf message ({exc})") from None


async def _parsed_stream(
    deserializer: Callable[[bytes], object] | None, requests: AsyncIterator, held: list
) -> AsyncIterator:
    async for data in requests:
        if isinstance(data, _Arrived) and data.ticket is not None and not held:
            held.append(data.ticket)  # released by the wrapper when the call ends
        try:  # a stream's message holds its charge until the next one is asked for
            yield _parse(deserializer, data)
        finally:
            _release(data)


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
                metrics.REQUEST_DURATION.labels(method=self.method, code=code.name),
            )
        metrics.INFLIGHT.dec()
        children[0].inc()
        children[1].observe(seconds)


class ServiceInterceptor(aio.ServerInterceptor):
    """See the module docstring. ``max_active`` None: no admission limit."""

    def __init__(
        self,
        services: Collection[str],
        tokens: Iterable[str] = (),
        max_active: int | None = None,
        budget: RequestBudget | None = None,
        max_open: int | None = None,
    ) -> None:
        self._services = frozenset(services)
        self.set_tokens(tokens)
        self._max_active = max_active
        # method -> (its handler, the wrapped handler, its metric children; None for probes)
        self._wrapped: dict[str, tuple[object, object, _CallMetrics | None]] = {}
        self.budget = budget
        # Calls open at once, counted from their metadata (so before their message is received): bounds the
        # memory of messages being received, which the budget only sees once they are complete.
        self._max_open = max_open
        self.open_calls = 0
        self.active = 0  # admitted calls not finished yet
        self.finished = 0  # admitted calls finished, whatever their status

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable], details: grpc.HandlerCallDetails
    ):
        handler = await continuation(details)
        if handler is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[details.method] = (handler, *self._wrap(handler, details.method))
        _, wrapped, calls = cached
        if calls is None:  # health, reflection
            return wrapped
        # Per call, from the metadata alone (before a byte of the body is read): auth and admission; then the
        # shared wrapped handler with a per-call "deserializer" that holds the call's ticket and charges the
        # message's bytes to the budget as they arrive.
        refusal = self._refusal(details.invocation_metadata)
        if refusal is not None:
            return self._refused(handler, calls, *refusal)
        if self.budget is None and self._max_open is None:
            return wrapped
        return wrapped._replace(request_deserializer=_arrival(self.budget, Ticket(self)))

    def _wrap(self, handler, full_method: str):
        service = full_method.lstrip("/").split("/")[0]
        if service not in self._services:
            return self._probe(handler), None
        calls = _CallMetrics(full_method.lstrip("/"))
        parse, serialize = handler.request_deserializer, _serializer(handler.response_serializer)
        if handler.unary_unary:
            wrapped = grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, calls, parse, serialize))
        elif handler.stream_stream:
            wrapped = grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.stream_stream, calls, parse, serialize)
            )
        elif handler.unary_stream:
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, calls, parse, serialize)
            )
        else:
            wrapped = grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, calls, parse, serialize))
        return wrapped, calls

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

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

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

    @staticmethod
    def _refused(handler, calls: _CallMetrics, code: grpc.StatusCode, message: str):
        """A handler for ``handler``'s method that answers ``code`` without reading the request: it takes the
        request as a stream and never iterates it, so gRPC never receives or parses the message."""

        def record() -> None:
            metrics.INFLIGHT.inc()
            calls.record(code, 0.0)

        kwargs = {
            "request_deserializer": _tolerant(handler.request_deserializer, count=True),
            "response_serializer": handler.response_serializer,
        }
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
    def _unary(self, behavior, calls: _CallMetrics, parse, serialize):
        async def wrapper(request, context: aio.ServicerContext):
            metrics.INFLIGHT.inc()
            start = time.perf_counter()
            held: list = []
            try:
                request = _prepared(parse, request, held)
                with self._admitted():
                    response = serialize(await behavior(request, context))
            except BaseException as exc:
                await self._fail(exc, context, calls, start)
            finally:
                _release_all(held)
            calls.record(grpc.StatusCode.OK, time.perf_counter() - start)
            return response

        return wrapper

    def _streaming(self, behavior, calls: _CallMetrics, parse, serialize):
        async def wrapper(request_or_iterator, context: aio.ServicerContext):
            metrics.INFLIGHT.inc()
            start = time.perf_counter()
            held: list = []
            try:
                request_or_iterator = _prepared(parse, request_or_iterator, held)
                with self._admitted():
                    async for response in behavior(request_or_iterator, context):
                        yield serialize(response)
            except BaseException as exc:
                await self._fail(exc, context, calls, start)
            finally:
                _release_all(held)
            calls.record(grpc.StatusCode.OK, time.perf_counter() - start)

        return wrapper

    async def _fail(self, exc: BaseException, context: aio.ServicerContext, calls: _CallMetrics, start: float) -> None:
        """End a failed call: abort with the status ``exc`` maps to, or re-raise it (cancellation, a deadline,
        an abort already sent). Never returns."""
        status = self._record_failure(exc, context, calls, start)
        if status is None:
            raise exc
        await context.abort(*status)

    def _record_failure(
        self, exc: BaseException, context: aio.ServicerContext, calls: _CallMetrics, start: float
    ) -> tuple[grpc.StatusCode, str] | None:
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
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        )
