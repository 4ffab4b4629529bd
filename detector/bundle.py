"""Model bundles: a directory with ``model.safetensors`` and ``bundle.json``, plus optional parts.

A bundle describes itself: architecture and arguments, training config and command, classes, input
shape, normalisation, dataset fingerprint, metrics, and a SHA-256 for every file it holds, which
loading verifies. Parts added later (the detector, class prototypes) are a ``<part>.safetensors``
for tensors and a ``<part>.json`` for everything else. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .models import DecoupledNet, create_model
from .prototypes import Prototypes

if TYPE_CHECKING:
    from .detectors import FeatureDetector
    from .detectors.record import DetectorRecord

FORMAT = "pathguard-bundle"
VERSION = 1
META_FILE = "bundle.json"
MODEL_FILE = "model.safetensors"
# The bundle this repository ships; the container image sets PATHGUARD_BUNDLE to where it bakes its copy.
DEFAULT_BUNDLE = str(Path(__file__).resolve().parent.parent / "models" / "default")
BUNDLE_ENV = "PATHGUARD_BUNDLE"
BUNDLE_HELP = "bundle directory (default: $PATHGUARD_BUNDLE or models/default)"
_REQUIRED = {
    "format": str,
    "version": int,
    "name": str,
    "arch": str,
    "arch_args": dict,
    "gated": bool,
    "classes": list,
    "input_shape": list,
    "files": dict,
}


def default_bundle() -> str:
    """``$PATHGUARD_BUNDLE`` when set (as in the container image), else the repository's models/default."""
    return os.environ.get(BUNDLE_ENV) or DEFAULT_BUNDLE


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the bundle and the file at fault."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _publish(tmp: str, path: Path) -> None:
    """Give the temp file ordinary permissions (mkstemp makes it 0600, which a container's non-root user
    could not read from an image built by root) and rename it into place atomically."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically (temp file + rename), so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    _publish(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    _publish(tmp, path)


def save_bundle(
    out_dir: str | Path,
    model: DecoupledNet,
    *,
    arch: str,
    arch_args: dict,
    classes: list[str],
    train_config: dict,
    dataset: dict,
    metrics: dict,
    command: str,
    name: str = "pathguard",
) -> Path:
    """Write ``model`` and its description to ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(out / MODEL_FILE, model.state_dict())
    gate = None
    if model.gated:
        gate = train_config.get("gate")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "model_version": "1",
        "arch": arch,
        "arch_args": arch_args,
        "gated": model.gated,
        "gate": gate,
        "classes": list(classes),
        "input_shape": [model.in_channels, model.input_size, model.input_size],
        "normalization": {"mean": arch_args.get("mean"), "std": arch_args.get("std")},
        "layers": [{"name": n, "filters": c} for n, c in zip(model.layer_names, model.gate_sizes)],
        "dataset": dataset,
        "seed": train_config.get("seed"),
        "train_config": train_config,
        "command": command,
        "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {MODEL_FILE: sha256_file(out / MODEL_FILE)},
    }
    _write_json(out / META_FILE, meta)
    return out


def read_document(
    path: Path,
    *,
    required: dict[str, type],
    fmt: str,
    version: int,
    error: type[ValueError] = ValueError,
    where: str = "",
) -> dict:
    """A self-describing JSON file (a bundle's or a checkpoint's): parsed, its fields' types and its
    format/version checked; anything else raises ``error`` with ``where`` as the message's prefix."""
    where = where or str(path)
    if not path.is_file():
        raise error(f"{where}: {path.name} not found")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{where}: {path.name} is not valid JSON ({exc}): the file is corrupt") from None
    if not isinstance(meta, dict):
        raise error(f"{where}: {path.name} must hold a JSON object")
    for key, typ in required.items():
        if not isinstance(meta.get(key), typ):
            raise error(f"{where}: {path.name} field {key!r} missing or not a {typ.__name__}")
    if meta["format"] != fmt or meta["version"] > version:
        raise error(
            f"{where}: format {meta['format']!r} v{meta['version']} is not supported "
            f"(this PathGuard reads {fmt!r} up to v{version})"
        )
    return meta


def read_meta(path: str | Path) -> dict:
    """``bundle.json`` of a bundle, checked for the fields every bundle has."""
    path = Path(path)
    return read_document(
        path / META_FILE, required=_REQUIRED, fmt=FORMAT, version=VERSION, error=BundleError, where=f"bundle {path}"
    )


def verify_files(path: Path, meta: dict) -> None:
    """Every file the bundle lists exists and matches its SHA-256."""
    for name, digest in meta["files"].items():
        f = path / name
        if Path(name).name != name:
            raise BundleError(f"bundle {path}: file name {name!r} must not contain a path")
        if not f.is_file():
            raise BundleError(f"bundle {path}: {name} is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise BundleError(
                f"bundle {path}: {name} does not match its SHA-256 in {META_FILE} "
                f"(expected {digest[:16]}..., found {actual[:16]}...): "
                "the file was altered or is corrupt"
            )


def write_part(
    path: str | Path, part: str, *, tensors: dict[str, Tensor] | None = None, info: dict | None = None
) -> None:
    """Add or replace part ``part`` of a bundle and record its files' SHA-256 in ``bundle.json``."""
    path = Path(path)
    meta = read_meta(path)
    for suffix, payload in ((".safetensors", tensors), (".json", info)):
        name = part + suffix
        if payload is None:
            meta["files"].pop(name, None)
            (path / name).unlink(missing_ok=True)
            continue
        if suffix == ".json":
            _write_json(path / name, payload)
        else:
            _save_tensors(path / name, payload)
        meta["files"][name] = sha256_file(path / name)
    _write_json(path / META_FILE, meta)


@dataclass
class Bundle:
    """A loaded bundle. ``model`` maps (N, C, H, W) images in [0, 1] to logits.

    ``parts`` holds each optional part as ``(tensors, info)``; :meth:`prototypes`, :meth:`detector` and
    :meth:`detector_record` return them typed.
    """

    path: Path
    meta: dict
    model: DecoupledNet
    parts: dict[str, tuple[dict[str, Tensor], dict]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["input_shape"])  # type: ignore[return-value]

    @property
    def model_digest(self) -> str:
        """SHA-256 of ``model.safetensors``: what caches of attacks on this model are keyed by."""
        return self.meta["files"][MODEL_FILE]

    def part(self, name: str) -> tuple[dict[str, Tensor], dict] | None:
        return self.parts.get(name)

    def prototypes(self) -> Prototypes | None:
        """The class prototype paths, or None when the bundle has none (before ``fit-detector``)."""
        part = self.parts.get("prototypes")
        return None if part is None else Prototypes.from_state(*part)

    def detector(self) -> FeatureDetector | None:
        """The fitted detector (a :class:`PathDetector` or a :class:`PathEnsembleDetector`, as ``detector.json``
        says), or None when the bundle has none."""
        from .detectors import detector_from_state

        part = self.parts.get("detector")
        return None if part is None else detector_from_state(*part)

    def detector_record(self) -> DetectorRecord | None:
        """How the detector was fitted (``detector.json``), or None when the bundle has no detector."""
        from .detectors.record import DetectorRecord

        part = self.parts.get("detector")
        return None if part is None else DetectorRecord.from_info(part[1])

    def fitted(self) -> tuple[Prototypes, FeatureDetector]:
        """Prototypes and detector; ``ValueError`` saying how to fit them when the bundle has none."""
        protos, det = self.prototypes(), self.detector()
        if protos is None or det is None:
            raise ValueError(
                f"bundle {self.path} has no fitted detector; run `pathguard fit-detector --bundle {self.path}` first"
            )
        return protos, det

    def screener(self, **kwargs: Any):
        """The :class:`~detector.screening.Screener` of this bundle (model + fitted detector)."""
        from .screening import Screener

        return Screener.from_bundle(self, **kwargs)

    def screen(self, images: Tensor, **kwargs: Any):
        """Predict and screen images (N, C, H, W) in [0, 1]; see :meth:`Screener.screen`."""
        return self.screener().screen(images, **kwargs)


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load and verify a bundle directory. Raises :class:`BundleError` naming what is wrong."""
    path = Path(path)
    meta = read_meta(path)
    if MODEL_FILE not in meta["files"]:
        raise BundleError(f"bundle {path}: {META_FILE} lists no {MODEL_FILE}")
    verify_files(path, meta)
    try:
        model = create_model(meta["arch"], gated=meta["gated"], gate=meta.get("gate"), **meta["arch_args"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bundle {path}: cannot build {meta['arch']!r} from its arguments: {exc}") from None
    state = load_file(str(path / MODEL_FILE))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"bundle {path}: {MODEL_FILE} does not fit {meta['arch']}: {exc}") from None
    model.to(device).eval()
    parts: dict[str, tuple[dict[str, Tensor], dict]] = {}
    stems = {Path(n).stem for n in meta["files"] if n != MODEL_FILE}
    for stem in sorted(stems):
        tensors = load_file(str(path / f"{stem}.safetensors")) if f"{stem}.safetensors" in meta["files"] else {}
        info = json.loads((path / f"{stem}.json").read_text()) if f"{stem}.json" in meta["files"] else {}
        parts[stem] = (tensors, info)
    return Bundle(path, meta, model, parts)
