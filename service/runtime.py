"""A loaded bundle ready to screen: the model, its detector and what callers need to know about it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from detector import load_bundle
from detector.screening import Screener, ScreenResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the service says about its model (DescribeModel, KServe ModelMetadata, metrics)."""

    name: str
    version: str
    arch: str
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]
    threshold: float
    layers: tuple[tuple[str, int], ...]
    metrics: dict[str, float] = field(default_factory=dict)
    path: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def path_length(self) -> int:
        return sum(n for _, n in self.layers)


def _flatten_metrics(obj: object, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as {"a.b.c": value}; everything else is skipped."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_flatten_metrics(value, f"{prefix}{key}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix[:-1]] = float(obj)
    return out


@dataclass
class ServedResult(ScreenResult):
    """A :class:`ScreenResult` with the description of the model that computed it.

    A reload can swap the model while a request waits in the queue; the response is labelled (class names,
    model version) from ``info``, so that it describes the bundle that actually screened the images.
    """

    info: ModelInfo | None = None


class ModelRuntime:
    """The one object that runs the model. Not thread-safe: only the batching worker calls :meth:`screen`."""

    def __init__(self, screener: Screener, info: ModelInfo) -> None:
        self.screener = screener
        self.info = info

    @classmethod
    def load(cls, path: str | Path, engine: str = "skipping") -> ModelRuntime:
        """Load and verify a bundle (raises :class:`detector.BundleError` naming the bad file).

        ``engine``: ``"skipping"`` computes only the filters whose gate is on (same results within 1e-5,
        faster on CPU: see bench/accel_bench.py); ``"masked"`` runs every filter and multiplies by the gate.
        """
        bundle = load_bundle(path)
        screener = bundle.screener(engine=engine)
        meta = bundle.meta
        layers = tuple((str(layer["name"]), int(layer["filters"])) for layer in meta.get("layers", []))
        if not layers:
            model = bundle.model
            layers = tuple(zip(model.layer_names, model.gate_sizes, strict=True))
        info = ModelInfo(
            name=str(meta.get("name") or "pathguard"),
            version=str(meta.get("model_version") or "1"),
            arch=str(meta["arch"]),
            classes=tuple(str(c) for c in bundle.classes),
            input_shape=tuple(int(s) for s in bundle.input_shape),  # type: ignore[arg-type]
            threshold=screener.threshold,
            layers=layers,
            metrics=_flatten_metrics(meta.get("metrics", {})),
            path=str(path),
        )
        return cls(screener, info)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.info.input_shape

    def screen(self, images: Tensor) -> ServedResult:
        # the codec validated every request's images before they were queued
        return ServedResult(**vars(self.screener.screen(images, validate=False)), info=self.info)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Run each batch size once on grey images, so the first caller pays no lazy initialisation; seconds."""
        start = time.perf_counter()
        for n in batch_sizes:
            self.screen(torch.full((n, *self.input_shape), 0.5))
        elapsed = time.perf_counter() - start
        log.info(
            "warmed up %s v%s on batch sizes %s in %.2f s",
            self.info.name,
            self.info.version,
            list(batch_sizes),
            elapsed,
        )
        return elapsed


def slice_result(result: ScreenResult, start: int, stop: int) -> ScreenResult:
    """Rows ``start:stop`` of a batch's result (the part that belongs to one request)."""
    return type(result)(**{k: (v[start:stop] if isinstance(v, np.ndarray) else v) for k, v in vars(result).items()})
