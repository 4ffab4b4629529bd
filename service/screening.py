"""The screening service in plain Python: load a bundle, accept images, batch them, return results.

The gRPC servicers only translate protobuf to the calls below and back; tests and other front ends can
use :class:`ScreeningService` directly. It raises :mod:`service.errors` exceptions, never gRPC ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from detector.disclosure import Disclosure, check_policy, disclose
from detector.screening import ScreenResult

from . import codec, metrics
from .batching import MAX_BATCH_SIZE, MAX_QUEUE_DELAY_MS, MAX_QUEUE_SIZE, DynamicBatcher
from .errors import ModelNotFound, NotReady
from .runtime import ModelInfo, ModelRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Batching and request limits (the relevant part of :class:`service.config.ServeConfig`)."""

    max_batch_size: int = MAX_BATCH_SIZE
    max_queue_delay_ms: float = MAX_QUEUE_DELAY_MS
    max_queue_size: int = MAX_QUEUE_SIZE
    max_queue_images: int = 1024
    max_images_per_request: int = 64
    engine: str = "skipping"  # how the model runs: see ModelRuntime.load
    model_name: str | None = None  # served under this name instead of the bundle's
    score_policy: str = "full"  # what answers reveal: see detector.disclosure


class ScreeningService:
    """Owns the model runtime and the dynamic batcher. ``load`` (or ``reload``) makes it ready."""

    def __init__(self, limits: Limits = Limits()) -> None:
        check_policy(limits.score_policy)
        self.limits = limits
        self._batcher = DynamicBatcher(
            max_batch_size=limits.max_batch_size,
            max_queue_delay=limits.max_queue_delay_ms / 1000.0,
            max_queue_size=limits.max_queue_size,
            max_queue_images=limits.max_queue_images,
        ).start()
        self._runtime: ModelRuntime | None = None
        self._load_lock = threading.Lock()
        # Decoding (PNG/JPEG, typed values, large buffers) runs here, off the event loop: one request of 64
        # JPEGs must not stall every other call. PIL and numpy release the GIL for the heavy part.
        self._decoder = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="pathguard-decode"
        )

    # -- model lifecycle ------------------------------------------------------------------------
    def load(self, path: str | Path) -> ModelInfo:
        """Load, verify and warm up a bundle, then swap it in atomically; the old model (if any) serves until
        the swap. Raises :class:`detector.BundleError` (the old model stays) when the bundle is broken."""
        with self._load_lock:
            runtime = ModelRuntime.load(path, self.limits.engine)
            if self.limits.model_name:
                runtime.info = dataclasses.replace(runtime.info, name=self.limits.model_name)
            sizes = tuple(sorted({1, min(self.limits.max_batch_size, self.limits.max_images_per_request)}))
            runtime.warmup(sizes)
            previous = self.swap(runtime)
        info = runtime.info
        if previous is None:  # a reload is logged by its caller, once its metrics are recorded
            log.info("serving %s v%s (%s) from %s", info.name, info.version, info.arch, path)
        return info

    reload = load

    def swap(self, runtime: ModelRuntime) -> ModelRuntime | None:
        """Serve the next batches with ``runtime`` (already loaded and warm); returns the previous one."""
        self._batcher.set_runner(runtime)
        previous, self._runtime = self._runtime, runtime
        info = runtime.info
        metrics.set_model_info(info.name, info.version, info.arch, info.threshold, info.classes)
        return previous

    def close(self, timeout: float | None = None) -> None:
        """Finish queued requests and stop the worker."""
        self._batcher.stop(timeout)
        self._decoder.shutdown(wait=False, cancel_futures=True)

    @property
    def batcher(self) -> DynamicBatcher:
        """The dynamic batcher (its worker's health for the watchdog; ``fault_hook`` for tests)."""
        return self._batcher

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model now."""
        return self._batcher.queued

    @property
    def ready(self) -> bool:
        return self._runtime is not None

    @property
    def info(self) -> ModelInfo:
        """The loaded model's description; :class:`NotReady` before the first load."""
        runtime = self._runtime
        if runtime is None:
            raise NotReady("the model is still loading")
        return runtime.info

    def check_model(self, name: str, version: str = "") -> ModelInfo:
        """The model if ``name`` (and ``version``, when given) is the one served, else :class:`ModelNotFound`."""
        info = self.info
        if name != info.name:
            raise ModelNotFound(f"model {name!r} is not served here; this server serves {info.name!r}")
        if version and version != info.version:
            raise ModelNotFound(
                f"version {version!r} of model {name!r} is not served here; this server serves version {info.version!r}"
            )
        return info

    # -- decoding (validated against the current model) ----------------------------------------------
    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap decoding of a request, so that a forming batch may wait for it."""
        with self._batcher.arriving():
            yield

    async def decode(self, decode: Callable[..., Tensor], *args: object) -> Tensor:
        """``decode(*args)`` on the decoding threads (the event loop goes on serving meanwhile)."""
        with self.arriving():
            return await asyncio.get_running_loop().run_in_executor(self._decoder, decode, *args)

    def images_from_buffer(self, data: bytes, dtype: str, shape: Sequence[int]) -> Tensor:
        return codec.images_from_buffer(data, dtype, shape, self.info.input_shape, self.limits.max_images_per_request)

    def images_from_values(self, values: Sequence[float], dtype: str, shape: Sequence[int]) -> Tensor:
        return codec.images_from_values(values, dtype, shape, self.info.input_shape, self.limits.max_images_per_request)

    def images_from_encoded(self, files: Sequence[bytes]) -> Tensor:
        return codec.images_from_encoded(files, self.info.input_shape, self.limits.max_images_per_request)

    # -- screening ------------------------------------------------------------------------------
    @property
    def score_policy(self) -> str:
        return self.limits.score_policy

    def disclose(self, result: ScreenResult) -> Disclosure:
        """What callers are told of ``result`` under this deployment's score policy."""
        return disclose(result, self.limits.score_policy)

    async def screen(self, images: Tensor, timeout: float | None = None) -> ScreenResult:
        """Screen validated images (N, C, H, W) in [0, 1] through the batcher.

        ``timeout`` (seconds; the caller's remaining deadline) bounds the time in the queue: a request still
        queued when it runs out is not computed (:class:`~service.errors.DeadlineExpired`). Cancelling the
        awaiting task withdraws the request.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        return await self._batcher.submit(images, deadline, asyncio.get_running_loop())
