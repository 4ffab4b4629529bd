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


class Cancelled(ServiceError):
    """The caller went away; nothing is sent back."""

    code = grpc.StatusCode.CANCELLED


INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message to return for ``exc``."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.reason
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
