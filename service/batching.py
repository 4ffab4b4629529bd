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
A full queue answers :class:`Overloaded` at once.

:meth:`DynamicBatcher.set_runner` swaps the model between two batches (bundle reload): a batch runs
entirely on the runner it started with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from detector.screening import ScreenResult

from . import metrics
from .errors import DeadlineExpired, InvalidInput, NotReady, Overloaded
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


@dataclass
class _Request:
    images: Tensor
    deadline: float | None  # time.monotonic() after which the caller no longer waits
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.images)


class DynamicBatcher:
    """Queue + worker thread around a :class:`Runner`. Start with :meth:`start`, end with :meth:`stop`."""

    def __init__(self, runner: Runner | None = None, *, max_batch_size: int = MAX_BATCH_SIZE,
                 max_queue_delay: float = MAX_QUEUE_DELAY_MS / 1000, max_queue_size: int = MAX_QUEUE_SIZE) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size={max_queue_size} must be >= 1")
        if max_queue_delay < 0:
            raise ValueError(f"max_queue_delay={max_queue_delay} must be >= 0 seconds")
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_size = max_queue_size
        self._runner = runner
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._arriving = 0
        self._computing = 0  # images of the batch running now
        self._peak = 0  # most images in the system at once (queued + computing), recently
        self._peak_at = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None

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

    # -- callers --------------------------------------------------------------------------------
    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being decoded), so a forming batch waits for it."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def submit(self, images: Tensor, deadline: float | None = None) -> Future:
        """Queue validated images (N, C, H, W); the future resolves to their :class:`ScreenResult`.

        Cancel the future to withdraw the request (it is skipped if not yet computing).
        """
        request = _Request(images, deadline)
        with self._cond:
            if self._stopping:
                raise NotReady("the server is shutting down")
            if self._runner is None:
                raise NotReady("no model is loaded yet")
            if len(self._queue) >= self.max_queue_size:
                raise Overloaded(f"the queue is full ({self.max_queue_size} requests waiting); retry later")
            self._queue.append(request)
            self._note_load(self._queued_images() + self._computing)
            metrics.QUEUE_DEPTH.set(len(self._queue))
            self._cond.notify_all()
        return request.future

    # -- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            free_since = time.monotonic()
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                waited = time.monotonic()
                self._wait_for_batch(free_since)
                batch, runner = self._take(), self._runner
                self._computing = sum(len(r) for r in batch)
                metrics.QUEUE_DEPTH.set(len(self._queue))
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("batch of %d requests after %.1f ms idle + %.1f ms waiting; %d left queued, %d arriving",
                              len(batch), 1000 * (waited - free_since), 1000 * (time.monotonic() - waited),
                              len(self._queue), self._arriving)
            try:
                self._compute(batch, runner)
            finally:
                with self._cond:
                    self._computing = 0

    def _queued_images(self) -> int:
        return sum(len(r) for r in self._queue)

    def _note_load(self, present: int) -> None:
        """Track the recent peak of images in the system; it is what a forming batch expects to get."""
        now = time.monotonic()
        if present >= self._peak or now - self._peak_at > PEAK_WINDOW:
            self._peak, self._peak_at = present, now

    def _wait_for_batch(self, free_since: float) -> None:
        """Hold the batch up to max_queue_delay while more images are expected (lock held).

        The delay counts from when the oldest request arrived or the worker became free, whichever is later:
        under load, requests that queued up while the previous batch ran would otherwise dispatch at once as a
        fragment of a batch, while the callers of the previous batch are about to send their next requests.
        """
        until = max(self._queue[0].enqueued, free_since) + self.max_queue_delay
        while not self._stopping:
            queued = self._queued_images()
            if queued >= self.max_batch_size:
                return
            if queued >= self._peak and self._arriving == 0:
                return
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take(self) -> list[_Request]:
        """Whole requests, oldest first, up to max_batch_size images (the first one always)."""
        batch = [self._queue.popleft()]
        total = len(batch[0])
        while self._queue and total + len(self._queue[0]) <= self.max_batch_size:
            total += len(self._queue[0])
            batch.append(self._queue.popleft())
        return batch

    def _compute(self, batch: list[_Request], runner: Runner | None) -> None:
        now = time.monotonic()
        live = []
        for request in batch:
            if not request.future.set_running_or_notify_cancel():
                continue  # the caller cancelled or went away
            if request.deadline is not None and now >= request.deadline:
                request.future.set_exception(DeadlineExpired(
                    f"the deadline passed after {now - request.enqueued:.3f} s in the queue; not computed"))
                continue
            if runner is None or tuple(request.images.shape[1:]) != tuple(runner.input_shape):
                request.future.set_exception(InvalidInput(
                    "the model was replaced by one with another input shape while this request waited"))
                continue
            metrics.QUEUE_DURATION.observe(now - request.enqueued)
            live.append(request)
        if not live:
            return
        images = live[0].images if len(live) == 1 else torch.cat([r.images for r in live])
        assert runner is not None  # every request was refused above when there is none
        try:
            result = runner.screen(images)
        except Exception as exc:
            log.exception("screening a batch of %d images failed", len(images))
            for request in live:
                request.future.set_exception(exc)
            return
        metrics.BATCH_SIZE.observe(len(images))
        metrics.observe_results(result.scores, result.flags, result.active_ratio)
        start = 0
        for request in live:
            request.future.set_result(slice_result(result, start, start + len(request)))
            start += len(request)
