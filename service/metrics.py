"""Every Prometheus metric of the service, declared once, on the service's own registry.

Base units (seconds), ``_total`` counters, and only low-cardinality labels: the RPC method (a fixed set)
and the status code name. Request data (ids, images, model outputs) never becomes a label.
Served over HTTP at ``/metrics`` by :mod:`service.http_endpoint`.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
# process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds...: what a soak test watches.
ProcessCollector(registry=REGISTRY)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_UNIT_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))

REQUESTS = Counter("pathguard_requests", "RPCs handled, by method and gRPC status code.",
                   ["method", "code"], registry=REGISTRY)
REQUEST_DURATION = Histogram("pathguard_request_duration_seconds", "Time from receiving an RPC to its answer.",
                             ["method"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
QUEUE_DURATION = Histogram("pathguard_queue_duration_seconds",
                           "Time a request waited in the batching queue before its batch started.",
                           buckets=_LATENCY_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram("pathguard_batch_size", "Images per batch the model computed (after dynamic batching).",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY)
QUEUE_DEPTH = Gauge("pathguard_queue_depth", "Requests waiting in the batching queue.", registry=REGISTRY)
IMAGES = Counter("pathguard_images", "Images screened.", registry=REGISTRY)
FLAGGED = Counter("pathguard_adversarial_flagged", "Images whose adversarial score exceeded the threshold.",
                  registry=REGISTRY)
ADVERSARIAL_SCORE = Histogram("pathguard_adversarial_score", "Adversarial score of each screened image.",
                              buckets=(0.01, 0.05, *_UNIT_BUCKETS[:-1], 0.95, 0.99, 1.0), registry=REGISTRY)
ACTIVE_FILTER_RATIO = Histogram("pathguard_active_filter_ratio", "Fraction of gated filters each image ran.",
                                buckets=_UNIT_BUCKETS, registry=REGISTRY)
REQUEST_BYTES_PARSED = Counter("pathguard_request_bytes_parsed",
                               "Bytes of PathGuard and KServe request messages parsed (refused calls add none).",
                               registry=REGISTRY)
INFLIGHT = Gauge("pathguard_inflight_requests", "RPCs being handled now (queued or computing included).",
                 registry=REGISTRY)
MODEL_INFO = Info("pathguard_model", "The loaded model: name, version, architecture and detector threshold.",
                  registry=REGISTRY)


def observe_results(scores: np.ndarray, flags: np.ndarray, active_ratio: np.ndarray) -> None:
    """Record the per-image outputs of one computed batch."""
    IMAGES.inc(len(scores))
    FLAGGED.inc(int(np.count_nonzero(flags)))
    for s, a in zip(scores.tolist(), active_ratio.tolist(), strict=True):
        ADVERSARIAL_SCORE.observe(s)
        ACTIVE_FILTER_RATIO.observe(a)


def set_model_info(name: str, version: str, arch: str, threshold: float) -> None:
    MODEL_INFO.info({"name": name, "version": version, "arch": arch, "threshold": f"{threshold:.6g}"})

