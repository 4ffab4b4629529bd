"""``pathguard serve`` and ``pathguard screen``: flags and ``PATHGUARD_*`` variables from
:class:`~service.config.ServeConfig` / :class:`~service.config.ScreenConfig`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from service.config import ScreenConfig, ServeConfig

from .options import add_command, add_config_arguments, config_from, switch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _cmd_serve(args: argparse.Namespace) -> int:
    config = config_from(ServeConfig, args)
    if config.workers != 1:  # N processes on one port under a supervisor
        from service.workers import serve_workers

        return serve_workers(config)
    from service.server import serve

    return serve(config)


def _load_input(path: str):
    """A PNG/JPEG file's bytes (sent encoded); a .npy file (C, H, W) or (N, C, H, W) as an array (raw tensor)."""
    p = Path(path)
    if p.suffix.lower() not in IMAGE_SUFFIXES | {".npy"}:
        raise ValueError(f"{path}: expected a .png, .jpg/.jpeg or .npy file")
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    if p.suffix.lower() == ".npy":
        import numpy as np

        return np.load(p, allow_pickle=False)
    return p.read_bytes()


def _calls(paths: list[str], per_call: int, rows: dict[int, list[dict]]) -> list[list[tuple[int, str, object]]]:
    """Inputs grouped into calls: consecutive image files, up to ``per_call`` a call; each .npy on its own.
    A file that cannot be read gets its error row in ``rows`` and no call."""
    calls: list[list[tuple[int, str, object]]] = []
    group: list[tuple[int, str, object]] = []
    for i, path in enumerate(paths):
        try:
            data = _load_input(path)
        except (ValueError, OSError) as exc:
            rows[i] = [_error_row(path, "FILE", str(exc))]
            continue
        if isinstance(data, bytes):
            group.append((i, path, data))
            if len(group) == per_call:
                calls.append(group)
                group = []
        else:
            calls.append([(i, path, data)])
    return calls + ([group] if group else [])


def _error_row(path: str, code: str, message: str) -> dict:
    return {"image": path, "error": {"code": code, "message": message}}


# The server is out of reach or refuses this caller: no later call can do better.
_FATAL = {"UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED", "DEADLINE_EXCEEDED"}


def _row(path: str, i: int, n: int, r) -> dict:
    row = {
        "image": path if n == 1 else f"{path}[{i}]",
        "class_index": r.class_index,
        "class_name": r.class_name,
        "confidence": r.confidence if r.probabilities is not None or r.top_classes else None,
        "adversarial_score": r.adversarial_score,
        "is_adversarial": r.is_adversarial,
        "threshold": r.threshold,
        "active_filter_ratio": r.active_filter_ratio,
        "flops_fraction": r.flops_fraction,
        "score_policy": r.score_policy,
    }
    if r.top_classes:
        row["top_classes"] = [{"class_name": c.class_name, "probability": c.probability} for c in r.top_classes]
    return row


@dataclass
class ScreenRun:
    json: bool = switch("print JSON instead of a table")


def _screen_call(client, call: list[tuple[int, str, object]], top_k: int, rows: dict[int, list[dict]]) -> None:
    """One call for ``call``'s inputs, their rows into ``rows``; a refused group of files is retried file by
    file to mark the bad ones. Raises the ``grpc.RpcError`` of a failure no later call can avoid."""
    import grpc

    data = [d for _, _, d in call] if isinstance(call[0][2], bytes) else call[0][2]
    try:
        results = client.screen(data, top_k=top_k)
    except grpc.RpcError as exc:
        if exc.code().name in _FATAL:
            raise
        if len(call) > 1 and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            for one in call:
                _screen_call(client, [one], top_k, rows)
            return
        for i, path, _ in call:
            rows[i] = [_error_row(path, exc.code().name, exc.details())]
        return
    if isinstance(call[0][2], bytes):
        for (i, path, _), result in zip(call, results, strict=True):
            rows[i] = [_row(path, 0, 1, result)]
    else:
        i, path, _ = call[0]
        rows[i] = [_row(path, j, len(results), r) for j, r in enumerate(results)]


def _cmd_screen(args: argparse.Namespace) -> int:
    import grpc

    from service.client import PathGuardClient

    cfg = config_from(ScreenConfig, args)
    token = Path(cfg.token_file).read_text().strip() if cfg.token_file else None
    rows: dict[int, list[dict]] = {}  # input position -> its rows
    fatal = None
    try:
        with PathGuardClient(
            cfg.target,
            token=token,
            tls=cfg.tls,
            tls_ca=cfg.tls_ca,
            client_cert=cfg.client_cert,
            client_key=cfg.client_key,
            timeout=cfg.timeout,
            insecure_token=cfg.insecure_token,
        ) as client:
            per_call = cfg.batch or client.describe().max_images_per_request
            for call in _calls(args.images, per_call, rows):
                _screen_call(client, call, cfg.top_k, rows)
    except grpc.RpcError as exc:
        fatal = f"pathguard screen: {cfg.target}: {exc.code().name}: {exc.details()}"
    done = [row for i in sorted(rows) for row in rows[i]]
    if done:  # what was screened before a fatal error is still shown
        print(json.dumps(done, indent=2) if config_from(ScreenRun, args).json else format_table(done))
    if fatal:
        print(fatal, file=sys.stderr)
        return 1
    return 1 if any("error" in row for row in done) else 0


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of screening rows (errors on their own line)."""
    header = f"{'image':<32} {'class':<16} {'conf':>6} {'score':>6} {'adversarial':<11} {'active':>6} {'flops':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        image = row["image"] if len(row["image"]) <= 32 else "..." + row["image"][-29:]
        if "error" in row:
            lines.append(f"{image:<32} ERROR {row['error']['code']}: {row['error']['message']}")
            continue
        flag = "YES" if row["is_adversarial"] else "no"
        lines.append(
            f"{image:<32} {row['class_name'][:16]:<16} {_num(row['confidence'])} "
            f"{_num(row['adversarial_score'])} {flag:<11} {_num(row['active_filter_ratio'])} "
            f"{_num(row['flops_fraction'])}"
        )
        for c in row.get("top_classes", [])[1:]:
            lines.append(f"{'':<32} {c['class_name'][:16]:<16} {c['probability']:>6.3f}")
    first = next((r for r in rows if "error" not in r), {})
    if first.get("threshold") is not None:
        lines.append(f"(adversarial when score > threshold {first['threshold']:.4f})")
    elif first:
        lines.append(f"(this server reveals only the class and the flag: score policy {first['score_policy']!r})")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    """A 6-wide figure; '-' for what the server did not reveal (None, or NaN for a confidence)."""
    return f"{'-':>6}" if value is None or value != value else f"{value:>6.3f}"


def register(sub: argparse._SubParsersAction) -> None:
    add_command(
        sub,
        "serve",
        _cmd_serve,
        ServeConfig,
        help="serve a bundle over gRPC (own API + KServe v2), metrics over HTTP",
        description="Serve predict-and-screen over gRPC: pathguard.v1.PathGuard, KServe v2 "
        "inference.GRPCInferenceService, grpc.health.v1 and reflection; Prometheus "
        "metrics at http://HOST:METRICS_PORT/metrics. SIGTERM drains and exits 0; "
        "SIGHUP reloads the bundle.",
    )
    p = sub.add_parser("screen", help="screen image files with a running server and print a table or JSON")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files, or .npy arrays (C,H,W)/(N,C,H,W)")
    add_config_arguments(p, ScreenRun)
    add_config_arguments(p, ScreenConfig)
    p.set_defaults(func=_cmd_screen)
