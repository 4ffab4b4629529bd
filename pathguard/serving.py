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
    """A PNG/JPEG file is sent encoded; a .npy file (C, H, W) or (N, C, H, W) as a raw tensor."""
    p = Path(path)
    if p.suffix.lower() not in IMAGE_SUFFIXES | {".npy"}:
        raise ValueError(f"{path}: expected a .png, .jpg/.jpeg or .npy file")
    if not p.is_file():
        raise ValueError(f"{path}: no such file")
    if p.suffix.lower() == ".npy":
        import numpy as np

        return np.load(p, allow_pickle=False)
    return [p.read_bytes()]


def _row(path: str, i: int, n: int, r) -> dict:
    row = {"image": path if n == 1 else f"{path}[{i}]", "class_index": r.class_index,
           "class_name": r.class_name, "confidence": r.confidence,
           "adversarial_score": r.adversarial_score, "is_adversarial": r.is_adversarial,
           "threshold": r.threshold, "active_filter_ratio": r.active_filter_ratio,
           "flops_fraction": r.flops_fraction}
    if r.top_classes:
        row["top_classes"] = [{"class_name": c.class_name, "probability": c.probability} for c in r.top_classes]
    return row


@dataclass
class ScreenRun:
    json: bool = switch("print JSON instead of a table")


def _cmd_screen(args: argparse.Namespace) -> int:
    import grpc

    from service.client import PathGuardClient

    cfg = config_from(ScreenConfig, args)
    token = Path(cfg.token_file).read_text().strip() if cfg.token_file else None
    rows: list[dict] = []
    failed = False
    with PathGuardClient(cfg.target, token=token, tls_ca=cfg.tls_ca, client_cert=cfg.client_cert,
                         client_key=cfg.client_key, timeout=cfg.timeout) as client:
        for path in args.images:
            try:
                results = client.screen(_load_input(path), top_k=cfg.top_k)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
                    print(f"pathguard screen: {cfg.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                    return 1
                rows.append({"image": path, "error": {"code": exc.code().name, "message": exc.details()}})
                failed = True
                continue
            rows += [_row(path, i, len(results), r) for i, r in enumerate(results)]
    print(json.dumps(rows, indent=2) if config_from(ScreenRun, args).json else format_table(rows))
    return 1 if failed else 0


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
        lines.append(f"{image:<32} {row['class_name'][:16]:<16} {row['confidence']:>6.3f} "
                     f"{row['adversarial_score']:>6.3f} {flag:<11} {row['active_filter_ratio']:>6.3f} "
                     f"{row['flops_fraction']:>6.3f}")
        for c in row.get("top_classes", [])[1:]:
            lines.append(f"{'':<32} {c['class_name'][:16]:<16} {c['probability']:>6.3f}")
    if rows and "threshold" in next((r for r in rows if "error" not in r), {}):
        lines.append(f"(adversarial when score > threshold "
                     f"{next(r for r in rows if 'error' not in r)['threshold']:.4f})")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "serve", _cmd_serve, ServeConfig,
                help="serve a bundle over gRPC (own API + KServe v2), metrics over HTTP",
                       description="Serve predict-and-screen over gRPC: pathguard.v1.PathGuard, KServe v2 "
                                   "inference.GRPCInferenceService, grpc.health.v1 and reflection; Prometheus "
                                   "metrics at http://HOST:METRICS_PORT/metrics. SIGTERM drains and exits 0; "
                                   "SIGHUP reloads the bundle.")
    p = sub.add_parser("screen", help="screen image files with a running server and print a table or JSON")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files, or .npy arrays (C,H,W)/(N,C,H,W)")
    add_config_arguments(p, ScreenRun)
    add_config_arguments(p, ScreenConfig)
    p.set_defaults(func=_cmd_screen)
