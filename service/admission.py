"""What a request may take before it is read: a memory budget for messages and a count of open calls.

:class:`RequestBudget` charges each message when it has arrived, before it is parsed, and :class:`Charged`
gives the charge back when the parsed request is dropped (the call ended). :class:`Ticket` counts a call
from its metadata until its handler is released. Both release in ``__del__``, so a call that ends in any
way -- answered, cancelled, never dispatched -- gives back what it held. The interceptor
(:mod:`service.interceptors`) uses them; the server sizes them (:func:`service.server.request_budget`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class _Counts(Protocol):
    open_calls: int


class RequestBudget:
    """Memory that the requests in flight may take, in bytes.

    A message of n bytes is charged ``COPIES * n + decoded`` before it is parsed: while it is handled it
    exists as wire bytes, as the parsed message, as Python ``bytes`` of its fields and in the decoders'
    temporaries (an exploratory flood without the budget measured about 3.5 such copies for
    maximal PNG requests), plus its decoded float32 images (at most ``decoded`` bytes).
    """

    COPIES = 4

    def __init__(self, limit: int, decoded: int) -> None:
        self.limit, self.decoded = limit, decoded
        self.used = 0
        self._lock = threading.Lock()

    def charge(self, nbytes: int) -> int | None:
        """Reserve the charge of an ``nbytes`` message; None (nothing reserved) when it does not fit."""
        charge = self.COPIES * nbytes + self.decoded
        with self._lock:
            if self.used + charge > self.limit and self.used > 0:  # a lone request always fits
                return None
            self.used += charge
        return charge

    def release(self, charge: int) -> None:
        with self._lock:
            self.used -= charge


class Ticket:
    """One open call, counted from the moment its metadata arrived until its handler is released (however
    the call ends, even if it never reached the handler)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: _Counts) -> None:
        self._owner: _Counts | None = owner
        owner.open_calls += 1

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.open_calls -= 1

    def __del__(self) -> None:
        self.release()


class Charged:
    """A parsed request holding its budget charge: :meth:`release` gives it back (once) when its call ends,
    and dropping the holder does too, should the call never get that far."""

    __slots__ = ("message", "_budget", "_charge")

    def __init__(self, message: object, budget: RequestBudget, charge: int) -> None:
        self.message, self._budget, self._charge = message, budget, charge

    def release(self) -> None:
        charge, self._charge = self._charge, 0
        if charge:
            self._budget.release(charge)

    def __del__(self) -> None:
        self.release()


@contextmanager
def releasing(*held: object) -> Iterator[None]:
    """Release each :class:`Charged` request and :class:`Ticket` in ``held`` when the block ends, however it
    ends: a finished call's frame and handler can outlive it in reference cycles (an abort's traceback),
    so ``__del__`` alone would give them back only at the next garbage collection."""
    try:
        yield
    finally:
        for item in held:
            if isinstance(item, (Charged, Ticket)):
                item.release()
