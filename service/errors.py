"""Domain errors of the service and the one table that maps them to gRPC status codes.

The screening service and the codecs raise these; they know nothing about gRPC. The interceptor
(:mod:`service.interceptors`) and the streaming servicer turn them into status codes through
:func:`status_of`, the only place where that mapping lives. Anything that is not a
:class:`ServiceError` is a bug: it becomes INTERNAL with a generic message and is logged with its traceback.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of the service's errors. ``reason`` is the message returned to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidInput(ServiceError):
    """The request cannot be screened as sent (shape, dtype, range, size, encoding...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServiceError):
    """A KServe request named a model (or version) this server does not serve."""

    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ServiceError):
    """Missing or wrong bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Overloaded(ServiceError):
    """The batching queue is full; the caller should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(ServiceError):
    """The request's deadline passed while it waited in the queue; it was not computed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotReady(ServiceError):
    """No model is loaded yet, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class BatchFailed(ServiceError):
    """Computing or delivering the batch this request was part of raised; the server logged the traceback.

    Only the requests of that batch get it; the worker goes on with the next batch."""

    code = grpc.StatusCode.INTERNAL


INTERNAL_MESSAGE = "internal error; the server log has the details"
# Messages quote what the caller sent (a model name, a datatype, a shape), and a status message travels in
# an HTTP/2 trailer, percent-encoded: past the client's metadata limit (8 KiB by default) the caller would
# get RESOURCE_EXHAUSTED or INTERNAL instead of the real code. 1 KiB of UTF-8 stays below it.
MAX_MESSAGE_BYTES = 1024


def _bounded(message: str) -> str:
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    return data[: MAX_MESSAGE_BYTES - 16].decode("utf-8", "ignore") + " ...(truncated)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message to return for ``exc`` (at most :data:`MAX_MESSAGE_BYTES` of UTF-8)."""
    if isinstance(exc, ServiceError):
        return exc.code, _bounded(exc.reason)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
