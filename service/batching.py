"""Dynamic batching: one worker thread owns the model and merges concurrent requests into batches.

Like Triton's dynamic batcher: requests wait in a bounded queue; the worker takes whole requests, oldest
first, up to ``max_batch_size`` images, waiting at most ``max_queue_delay`` (counted from the oldest
request's arrival or from when the worker became free, whichever is later) for more to join. It waits only
while more are expected -- fewer images are queued than were in the system at once (queued + computing)
during the last second, or a request is being decoded right now -- so a lone caller is never held back by
the delay, while under load batches fill up instead of splitting into fragments. A request larger than
``max_batch_size`` runs as a batch of its own.

Before computing, the worker drops requests whose caller cancelled (their future was cancelled) and
answers those whose deadline has passed with :class:`DeadlineExpired`: neither costs model time.
A full queue (``max_queue_size`` requests or ``max_queue_images`` images) answers :class:`Overloaded` at once.

Faults heal: an exception while computing a batch or delivering its results fails exactly that batch's
requests with :class:`BatchFailed` (INTERNAL, with a message; the traceback is logged) and the worker goes
on with the next batch. :meth:`DynamicBatcher.stalled_for` tells a watchdog how long the worker has been
stuck (a batch computing, or the oldest request waiting), and :attr:`DynamicBatcher.alive` whether its
thread runs. :attr:`DynamicBatcher.fault_hook` is the test hook that injects those faults.

:meth:`DynamicBatcher.set_runner` swaps the model between two batches (bundle reload): a batch runs
entirely on the runner it started with.

Per-call cost (this is the server's hot path; ``bench/call_cost.py`` measures it by stage): a submission
takes the lock once and wakes the worker only when the worker is idle or the batch it is forming became
ready, not for every request; an asyncio caller gets an :class:`asyncio.Future` of its own loop and the
worker resolves all of one batch's futures with one ``call_soon_threadsafe`` (one wake-up of the event loop
per batch, not per request); per-image metrics are recorded once per batch (:func:`metrics.observe_many`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from detector.screening import ScreenResult

from . import metrics
from .errors import BatchFailed, DeadlineExpired, InvalidInput, NotReady, Overloaded, ServiceError
from .runtime import slice_result

log = logging.getLogger(__name__)

# How long a peak of concurrent images is remembered when deciding whether to wait for more.
# Defaults of the batcher, of screening.Limits and of `pathguard serve` (ServeConfig): defined once, here.
MAX_BATCH_SIZE = 32
MAX_QUEUE_DELAY_MS = 5.0
MAX_QUEUE_SIZE = 256
PEAK_WINDOW = 1.0


class Runner(Protocol):
    """What the worker needs from a model: its input shape and a batch call."""

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    def screen(self, images: Tensor) -> ScreenResult: ...


class _Request:
    __slots__ = ("images", "size", "deadline", "future", "loop", "enqueued")

    def __init__(self, images: Tensor, deadline: float | None, loop: asyncio.AbstractEventLoop | None) -> None:
        self.images = images
        self.size = len(images)
        self.deadline = deadline  # time.monotonic() after which the caller no longer waits
        self.loop = loop
        # An asyncio caller awaits a future of its own loop (resolved from the worker in one hop per batch);
        # a thread awaits a concurrent one.
        self.future: Future | asyncio.Future = loop.create_future() if loop is not None else Future()
        self.enqueued = time.monotonic()

    def claim(self) -> bool:
        """False if the caller has cancelled (then the request is dropped); else it may no longer cancel
        a concurrent future (an asyncio one can still be cancelled: its answer is then discarded)."""
        if isinstance(self.future, Future):
            return self.future.set_running_or_notify_cancel()
        return not self.future.done()


_Outcome = tuple["_Request", object, BaseException | None]  # a request and its result or its error


def _settle(outcomes: list[tuple[asyncio.Future, object, BaseException | None]]) -> None:
    """On the callers' event loop: resolve the futures of one batch (skipping those cancelled meanwhile)."""
    for future, result, exc in outcomes:
        if future.done():
            continue
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


class DynamicBatcher:
    """Queue + worker thread around a :class:`Runner`. Start with :meth:`start`, end with :meth:`stop`."""

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        max_batch_size: int = MAX_BATCH_SIZE,
        max_queue_delay: float = MAX_QUEUE_DELAY_MS / 1000,
        max_queue_size: int = MAX_QUEUE_SIZE,
        max_queue_images: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size={max_queue_size} must be >= 1")
        if max_queue_delay < 0:
            raise ValueError(f"max_queue_delay={max_queue_delay} must be >= 0 seconds")
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_size = max_queue_size
        # Requests are bounded in count and in images: 256 requests of 64 images each would be 16k images.
        self.max_queue_images = max_queue_images or max_queue_size * max_batch_size
        if self.max_queue_images < max_batch_size:
            raise ValueError(f"max_queue_images={self.max_queue_images} must be >= max_batch_size={max_batch_size}")
        self._runner = runner
        self._queue: deque[_Request] = deque()
        self._queued_images = 0
        self._cond = threading.Condition()
        self._arriving = 0
        self._computing = 0  # images of the batch running now
        self._peak = 0  # most images in the system at once (queued + computing), recently
        self._peak_at = 0.0
        self._worker_state = "busy"  # "idle" (waits for a request), "forming" (waits for a batch) or "busy"
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None  # when the batch computing now started
        # Test hook (fault injection): called with "compute" before each batch runs and "deliver" before its
        # results go out, on the worker thread; whatever it raises or however long it blocks is a fault.
        self.fault_hook: Callable[[str], None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> DynamicBatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pathguard-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the worker. New submissions get :class:`NotReady`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def set_runner(self, runner: Runner) -> None:
        """Serve the next batches with ``runner`` (atomic: a running batch finishes on the old one)."""
        with self._cond:
            self._runner = runner

    @property
    def runner(self) -> Runner | None:
        return self._runner

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False before start and after stop)."""
        return self._thread is not None and self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds the worker has made no progress: the age of the batch computing now or of the oldest
        queued request, whichever is older; 0 when idle. A watchdog compares it with its limit."""
        now = time.monotonic()
        busy = self._busy_since
        try:
            oldest = self._queue[0].enqueued  # read without the lock: the worker may pop it meanwhile
        except IndexError:
            oldest = now
        return max(0.0, now - min(oldest, busy if busy is not None else now))

    # -- callers --------------------------------------------------------------------------------
    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being decoded), so a forming batch waits for it.

        Called from one thread at a time per batcher (the server's event loop), so the counter needs no lock;
        the worker only reads it. A request that fails to decode wakes a forming batch that it held up.
        """
        self._arriving += 1
        try:
            yield
        except BaseException:
            self._arriving -= 1
            if self._worker_state == "forming":
                with self._cond:
                    self._cond.notify()
            raise
        self._arriving -= 1  # submit() follows at once and wakes the worker if the batch is ready

    def submit(
        self, images: Tensor, deadline: float | None = None, loop: asyncio.AbstractEventLoop | None = None
    ) -> Future | asyncio.Future:
        """Queue validated images (N, C, H, W); the future resolves to their :class:`ScreenResult`.

        With ``loop`` (call from that loop's thread) the future is an :class:`asyncio.Future` of it, else a
        :class:`concurrent.futures.Future`. Cancel the future to withdraw the request (it is skipped if not
        yet computing).
        """
        request = _Request(images, deadline, loop)
        with self._cond:
            if self._stopping:
                raise NotReady("the server is shutting down")
            if self._runner is None:
                raise NotReady("no model is loaded yet")
            if len(self._queue) >= self.max_queue_size:
                raise Overloaded(f"the queue is full ({self.max_queue_size} requests waiting); retry later")
            if self._queued_images + request.size > self.max_queue_images:
                raise Overloaded(f"the queue is full (at most {self.max_queue_images} images waiting); retry later")
            self._queue.append(request)
            self._queued_images += request.size
            self._note_load(self._queued_images + self._computing)
            state = self._worker_state
            if state == "idle" or (state == "forming" and self._batch_ready()):
                self._cond.notify()
        metrics.QUEUE_DEPTH.set(len(self._queue))
        return request.future

    # -- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            free_since = time.monotonic()
            with self._cond:
                self._worker_state = "idle"
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                waited = time.monotonic()
                self._worker_state = "forming"
                self._wait_for_batch(free_since)
                self._worker_state = "busy"
                batch, runner = self._take(), self._runner
                if not batch:  # every queued caller had cancelled
                    metrics.QUEUE_DEPTH.set(len(self._queue))
                    continue
                self._computing = sum(r.size for r in batch)
                self._busy_since = time.monotonic()
                queued = len(self._queue)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "batch of %d requests after %.1f ms idle + %.1f ms waiting; %d left queued, %d arriving",
                        len(batch),
                        1000 * (waited - free_since),
                        1000 * (time.monotonic() - waited),
                        queued,
                        self._arriving,
                    )
            metrics.QUEUE_DEPTH.set(queued)
            try:
                self._compute(batch, runner)
            except Exception as exc:  # a bug outside compute and delivery: still fail only this batch
                log.exception("a batch of %d requests failed; the worker goes on", len(batch))
                self._fail(batch, exc)
            finally:
                self._computing = 0
                self._busy_since = None

    def _note_load(self, present: int) -> None:
        """Track the recent peak of images in the system; it is what a forming batch expects to get."""
        now = time.monotonic()
        if present >= self._peak or now - self._peak_at > PEAK_WINDOW:
            self._peak, self._peak_at = present, now

    def _batch_ready(self) -> bool:
        """Whether a forming batch should go now (lock held): full, or as large as expected and nothing
        more on its way."""
        queued = self._queued_images
        return queued >= self.max_batch_size or (queued >= self._peak and self._arriving == 0)

    def _wait_for_batch(self, free_since: float) -> None:
        """Hold the batch up to max_queue_delay while more images are expected (lock held).

        The delay counts from when the oldest request arrived or the worker became free, whichever is later:
        under load, requests that queued up while the previous batch ran would otherwise dispatch at once as a
        fragment of a batch, while the callers of the previous batch are about to send their next requests.
        Submitters wake the worker only when the batch becomes ready (:meth:`submit`), so a batch of n requests
        costs one wake-up, not n.
        """
        until = max(self._queue[0].enqueued, free_since) + self.max_queue_delay
        while not self._stopping and not self._batch_ready():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take(self) -> list[_Request]:
        """Whole requests, oldest first, up to max_batch_size images (the first live one always).

        Requests whose caller cancelled while they queued leave the queue here and take no place in the batch:
        counted against its size, a cancelled request between two live ones would split them into two batches.
        (A caller that cancels after this is caught by :meth:`_Request.claim`.) Empty when every queued request
        was cancelled.
        """
        batch: list[_Request] = []
        total = 0
        while self._queue:
            request = self._queue[0]
            gone = request.future.cancelled()
            if batch and not gone and total + request.size > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_images -= request.size
            if not gone:
                batch.append(request)
                total += request.size
        return batch

    def _compute(self, batch: list[_Request], runner: Runner | None) -> None:
        now = time.monotonic()
        live: list[_Request] = []
        outcomes: list[_Outcome] = []
        for request in batch:
            if not request.claim():
                continue  # the caller cancelled or went away
            if request.deadline is not None and now >= request.deadline:
                outcomes.append(
                    (
                        request,
                        None,
                        DeadlineExpired(
                            f"the deadline passed after {now - request.enqueued:.3f} s in the queue; not computed"
                        ),
                    )
                )
            elif runner is None or tuple(request.images.shape[1:]) != tuple(runner.input_shape):
                outcomes.append(
                    (
                        request,
                        None,
                        InvalidInput(
                            "the model was replaced by one with another input shape while this request waited"
                        ),
                    )
                )
            else:
                live.append(request)
        if live:
            assert runner is not None  # every request was refused above when there is none
            metrics.observe_many(metrics.QUEUE_DURATION, np.array([now - r.enqueued for r in live]))
            outcomes.extend(self._screen(live, runner))
        with self._cond:
            # Answered images are no longer load: a caller may send its next request the moment it has its
            # answer, before this worker is done, and a forming batch must not wait for the answered ones.
            self._computing = 0
        try:
            self._deliver(outcomes)
        except Exception as exc:
            log.exception("delivering the results of a batch of %d requests failed", len(outcomes))
            self._fail([request for request, _, _ in outcomes], exc, "delivering the results of")

    def _screen(self, live: list[_Request], runner: Runner) -> list[_Outcome]:
        images = live[0].images if len(live) == 1 else torch.cat([r.images for r in live])
        start = time.perf_counter()
        try:
            self._hook("compute")
            result = runner.screen(images)
        except Exception as exc:
            log.exception("screening a batch of %d images failed", len(images))
            error = _batch_error(exc, "computing")
            return [(request, None, error) for request in live]
        metrics.COMPUTE_DURATION.observe(time.perf_counter() - start)
        try:
            self._hook("deliver")
            metrics.BATCH_SIZE.observe(len(images))
            info = getattr(result, "info", None) or getattr(runner, "info", None)
            classes = info.classes if info is not None else tuple(str(i) for i in range(result.probabilities.shape[1]))
            metrics.observe_results(
                result.predictions, result.scores, result.flags, result.active_ratio, result.threshold, classes
            )
            if len(live) == 1:
                return [(live[0], result, None)]
            out: list[_Outcome] = []
            start = 0
            for request in live:
                out.append((request, slice_result(result, start, start + request.size), None))
                start += request.size
            return out
        except Exception as exc:
            log.exception("delivering the results of a batch of %d images failed", len(images))
            error = _batch_error(exc, "delivering the results of")
            return [(request, None, error) for request in live]

    @staticmethod
    def _deliver(outcomes: list[_Outcome]) -> None:
        """Resolve the callers' futures: concurrent ones here, asyncio ones with one hop per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for request, result, exc in outcomes:
            if request.loop is not None:
                by_loop[request.loop].append((request.future, result, exc))
            elif exc is None:
                request.future.set_result(result)
            else:
                request.future.set_exception(exc)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # the loop was closed: its callers are gone
                log.debug("event loop closed; %d answers dropped", len(items))

    def _fail(self, batch: list[_Request], exc: Exception, doing: str = "handling") -> None:
        """Answer every request of ``batch`` not answered yet with :class:`BatchFailed` (an asyncio caller's
        answer already on its way wins: :func:`_settle` skips futures resolved meanwhile)."""
        error = _batch_error(exc, doing)
        self._deliver([(request, None, error) for request in batch if not request.future.done()])

    def _hook(self, stage: str) -> None:
        hook = self.fault_hook
        if hook is not None:
            hook(stage)


def _batch_error(exc: Exception, doing: str) -> Exception:
    """The error a failed batch's callers get: :class:`BatchFailed`, or a domain error the runner raised on
    purpose, which keeps its own status."""
    if isinstance(exc, ServiceError):
        return exc
    return BatchFailed(
        f"{doing} the batch this request was part of failed ({type(exc).__name__}); the server log has the details"
    )
