"""Every Prometheus metric of the service, declared once, on the service's own registry.

Base units (seconds), ``_total`` counters, and only low-cardinality labels: the RPC method (a fixed set),
the status code name, the predicted class (the model's class names) and the reload result. Request data
(ids, images, scores) never becomes a label. Served over HTTP at ``/metrics`` by :mod:`service.http_endpoint`.

One process or several: with ``pathguard serve --workers N`` every worker writes its samples to memory-mapped
files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, chosen by that variable being
set when this module is first imported) and the supervising process serves their sum
(:func:`multiprocess_registry`); gauges say how they combine (``livesum``: queue depth and calls in flight add
up; ``livemax``: the threshold and model description are the same in every worker).

Per-image outputs are recorded once per batch with :func:`observe_many` (one bucket count per bucket, not
one Python call per image): the batching worker owns the model's core, and a histogram update per image per
metric cost more than the rest of the bookkeeping of a batch.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Sequence

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

REGISTRY = CollectorRegistry(auto_describe=True)
if not MULTIPROCESS:
    # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds...: what a soak test watches;
    # python_info. With workers the supervisor exports these per worker (service.workers).
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)

# Fine between 5 and 300 ms, where a batching server's latency lives (SLOs are set in that range), coarse
# outside it. The same buckets for every duration, so that request and queue time can be compared.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.06,
    0.075,
    0.1,
    0.125,
    0.15,
    0.175,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
_UNIT_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
# score - threshold: fine around 0, where the flag flips (a drift of the score distribution towards the
# threshold shows here before the flag rate moves).
MARGIN_BUCKETS = (
    -1.0,
    -0.5,
    -0.3,
    -0.2,
    -0.15,
    -0.1,
    -0.075,
    -0.05,
    -0.03,
    -0.02,
    -0.01,
    -0.005,
    0.0,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
)

REQUESTS = Counter(
    "pathguard_requests", "RPCs handled, by method and gRPC status code.", ["method", "code"], registry=REGISTRY
)
REQUEST_DURATION = Histogram(
    "pathguard_request_duration_seconds",
    "Time from receiving an RPC's message to its serialized answer (parsing, queue, "
    "model and serialization included), by method and gRPC status code.",
    ["method", "code"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_DURATION = Histogram(
    "pathguard_queue_duration_seconds",
    "Time a request waited in the batching queue before its batch started.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
COMPUTE_DURATION = Histogram(
    "pathguard_model_compute_duration_seconds",
    "Time the model took to screen one batch (forward pass, features and detector).",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "pathguard_batch_size",
    "Images per batch the model computed (after dynamic batching).",
    buckets=(1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 48, 64, 128, 256),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "pathguard_queue_depth", "Requests waiting in the batching queue.", registry=REGISTRY, multiprocess_mode="livesum"
)
INFLIGHT = Gauge(
    "pathguard_inflight_requests",
    "RPCs being handled now (queued or computing included).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
IMAGES = Counter("pathguard_images", "Images screened.", registry=REGISTRY)
PREDICTIONS = Counter(
    "pathguard_predictions",
    "Images screened, by predicted class (drift monitoring).",
    ["class_name"],
    registry=REGISTRY,
)
FLAGGED = Counter(
    "pathguard_adversarial_flagged",
    "Images whose adversarial score exceeded the threshold, by predicted class (a targeted attack "
    "shows as one class's flags rising).",
    ["class_name"],
    registry=REGISTRY,
)
ADVERSARIAL_SCORE = Histogram(
    "pathguard_adversarial_score",
    "Adversarial score of each screened image.",
    buckets=(0.01, 0.05, *_UNIT_BUCKETS[:-1], 0.95, 0.99, 1.0),
    registry=REGISTRY,
)
SCORE_MARGIN = Histogram(
    "pathguard_adversarial_score_margin",
    "Adversarial score minus the threshold, per screened image (> 0: flagged).",
    buckets=MARGIN_BUCKETS,
    registry=REGISTRY,
)
THRESHOLD = Gauge(
    "pathguard_adversarial_threshold",
    "The loaded detector's threshold on the adversarial score.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
ACTIVE_FILTER_RATIO = Histogram(
    "pathguard_active_filter_ratio",
    "Fraction of gated filters each image ran.",
    buckets=_UNIT_BUCKETS,
    registry=REGISTRY,
)
REQUEST_BYTES_PARSED = Counter(
    "pathguard_request_bytes_parsed",
    "Bytes of PathGuard and KServe request messages parsed (refused calls add none).",
    registry=REGISTRY,
)
MODEL_INFO = Gauge(
    "pathguard_model_info",
    "1 for the loaded model: name, version, architecture and threshold.",
    ["name", "version", "arch", "threshold"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
RELOADS = Counter(
    "pathguard_reloads", "Bundle reloads (SIGHUP), by result (success or failure).", ["result"], registry=REGISTRY
)
RELOAD_DURATION = Histogram(
    "pathguard_reload_duration_seconds",
    "Time to load, verify and warm up a bundle on reload (the old model serves meanwhile).",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
LAST_RELOAD = Gauge(
    "pathguard_last_reload_timestamp_seconds",
    "Unix time of the last successful reload.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
# The GC collector's series, fed by a gc callback, so that they add up across worker processes too.
GC_COLLECTIONS = Counter(
    "python_gc_collections", "Number of times this generation was collected.", ["generation"], registry=REGISTRY
)
GC_COLLECTED = Counter("python_gc_objects_collected", "Objects collected during gc.", ["generation"], registry=REGISTRY)
GC_UNCOLLECTABLE = Counter(
    "python_gc_objects_uncollectable", "Uncollectable objects found during gc.", ["generation"], registry=REGISTRY
)

# Both reload series exist from the start, so that increase() has a first point.
RELOADS.labels(result="success")
RELOADS.labels(result="failure")


def _gc_callback(phase: str, info: dict) -> None:
    if phase == "stop":
        generation = str(info["generation"])
        GC_COLLECTIONS.labels(generation=generation).inc()
        GC_COLLECTED.labels(generation=generation).inc(info["collected"])
        GC_UNCOLLECTABLE.labels(generation=generation).inc(info["uncollectable"])


if _gc_callback not in gc.callbacks:
    gc.callbacks.append(_gc_callback)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every v, in one pass: a bucket count per bucket instead of a call per value.

    Uses prometheus-client's histogram layout (``_upper_bounds``, non-cumulative ``_buckets``, ``_sum``), the
    same one its ``observe`` updates, so the exposition and multiprocess files are unchanged.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return
    histogram._raise_if_not_observable()
    # observe() puts v in the first bucket with v <= bound: searchsorted 'left' finds exactly that bucket.
    counts = np.bincount(
        np.searchsorted(histogram._upper_bounds, values, side="left"), minlength=len(histogram._upper_bounds)
    )
    for bucket, n in zip(histogram._buckets, counts.tolist(), strict=False):
        if n:
            bucket.inc(n)
    histogram._sum.inc(float(values.sum()))


class _ClassCounters:
    """Per-class children of :data:`PREDICTIONS` and :data:`FLAGGED` for one model's class names."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = tuple(classes)
        self.predictions = [PREDICTIONS.labels(class_name=c) for c in self.classes]
        self.flagged = [FLAGGED.labels(class_name=c) for c in self.classes]


_class_counters: dict[tuple[str, ...], _ClassCounters] = {}


def _counters_for(classes: Sequence[str]) -> _ClassCounters:
    key = tuple(classes)
    counters = _class_counters.get(key)
    if counters is None:
        counters = _class_counters[key] = _ClassCounters(key)
    return counters


def observe_results(
    predictions: np.ndarray,
    scores: np.ndarray,
    flags: np.ndarray,
    active_ratio: np.ndarray,
    threshold: float,
    classes: Sequence[str],
) -> None:
    """Record the per-image outputs of one computed batch."""
    IMAGES.inc(len(scores))
    counters = _counters_for(classes)
    k = len(counters.classes)
    for child, n in zip(counters.predictions, np.bincount(predictions, minlength=k).tolist(), strict=False):
        if n:
            child.inc(n)
    if flags.any():
        for child, n in zip(counters.flagged, np.bincount(predictions[flags], minlength=k).tolist(), strict=False):
            if n:
                child.inc(n)
    observe_many(ADVERSARIAL_SCORE, scores)
    observe_many(SCORE_MARGIN, scores - threshold)
    observe_many(ACTIVE_FILTER_RATIO, active_ratio)


_model_labels: dict[str, str] | None = None


def set_model_info(name: str, version: str, arch: str, threshold: float, classes: Sequence[str] = ()) -> None:
    """Describe the model now served: ``pathguard_model_info`` (the previous model's series drops to 0), the
    threshold gauge, and every class's counters at 0 so that a class nobody sent yet still shows."""
    global _model_labels
    labels = {"name": name, "version": version, "arch": arch, "threshold": f"{threshold:.6g}"}
    if _model_labels is not None and _model_labels != labels:
        MODEL_INFO.labels(**_model_labels).set(0)
    MODEL_INFO.labels(**labels).set(1)
    _model_labels = labels
    THRESHOLD.set(threshold)
    if classes:
        _counters_for(classes)


def record_reload(seconds: float, ok: bool) -> None:
    RELOADS.labels(result="success" if ok else "failure").inc()
    if ok:
        RELOAD_DURATION.observe(seconds)
        LAST_RELOAD.set(time.time())
