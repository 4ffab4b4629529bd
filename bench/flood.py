"""Flood a PathGuard server with maximal requests and report its resident memory against the stated bound.

``pathguard serve`` runs in a subprocess on loopback (its memory alone is measured, from /proc). Each of
``--callers`` threads sends ``--calls`` requests of the largest size the server accepts: 64 PNG files
(``max_images_per_request``) padded with text chunks to just under the receive limit derived from the
model. The report holds the idle resident memory (after start and one warm call), the peak during the
flood, the bound (``service.server.request_memory_bound``: twice ``max_request_memory_mb``) and the status
codes. The flood passes when the growth stays within bound + 64 MiB slack and no call is INTERNAL.

    export OMP_WAIT_POLICY=PASSIVE
    .venv/bin/python -m bench.flood --bundle models/default \\
        --json reports/service/flood.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, PngImagePlugin

from bench.helpers import ServerProcess, rss_bytes
from detector.bundle import read_meta
from service._proto.pathguard.v1 import pathguard_pb2 as pb
from service.config import ServeConfig
from service.server import request_memory_bound

SLACK = 64 << 20  # the allocator's and gRPC's own buffers, thread stacks, caches
SCREEN = "/pathguard.v1.PathGuard/ScreenImages"


def padded_png(image: np.ndarray, size: int) -> bytes:
    """A valid PNG of ``image`` ((H, W) or (H, W, 3) uint8) grown to exactly ``size`` bytes with a text chunk."""

    def png(text: str) -> bytes:
        info = PngImagePlugin.PngInfo()
        info.add_text("pad", text)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()

    base = len(png("x"))
    out = png("x" * (size - base + 1))
    if len(out) != size:
        raise ValueError(f"cannot pad a PNG of {base} bytes to {size}")
    return out


def maximal_request(shape: tuple[int, int, int], receive_limit: int, max_images: int, seed: int = 0) -> bytes:
    """A valid own-API request of ``max_images`` PNG files just under ``receive_limit`` bytes."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    per_file = (receive_limit - 4096) // max_images - 8  # 8: each file's field tag and length
    dims = (h, w) if c == 1 else (h, w, c)
    files = [padded_png(rng.integers(0, 256, dims, dtype=np.uint8), per_file) for _ in range(max_images)]
    data = pb.ScreenRequest(encoded=pb.EncodedImages(images=files)).SerializeToString()
    if not receive_limit - 8192 < len(data) <= receive_limit:
        raise ValueError(f"request of {len(data)} bytes is not just under the limit {receive_limit}")
    return data


def _config(server_args: list[str]) -> ServeConfig:
    """The ServeConfig that ``pathguard serve`` builds from ``server_args`` (flag, value pairs)."""
    cfg = ServeConfig()
    for flag, value in zip(server_args[::2], server_args[1::2], strict=True):
        name = flag.removeprefix("--").replace("-", "_")
        setattr(cfg, name, type(getattr(cfg, name))(value))
    return cfg


def _drive(call, payload: bytes, callers: int, calls: int, pid: int) -> tuple[Counter[str], list[int], float]:
    """``callers`` threads each send ``payload`` ``calls`` times while the resident memory of ``pid`` is sampled
    every 20 ms; returns the status codes, the samples (bytes) and the seconds the flood took."""
    samples: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            samples.append(rss_bytes(pid) or 0)
            time.sleep(0.02)

    codes: Counter[str] = Counter()
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(calls):
            try:
                call(payload, timeout=300)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                codes[code] += 1

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    pool = [threading.Thread(target=caller) for _ in range(callers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    done.set()
    watcher.join()
    return codes, samples, elapsed


def flood(bundle: str, callers: int, calls: int, threads: int = 1, server_args: list[str] = ()) -> dict:
    """Run the flood against a fresh ``pathguard serve`` of ``bundle``; returns the report."""
    shape = tuple(read_meta(bundle)["input_shape"])
    cfg = _config(server_args)
    bound = request_memory_bound(cfg, shape)
    payload = maximal_request(shape, cfg.receive_limit(shape), cfg.max_images_per_request)
    server = ServerProcess(bundle, threads=threads, args=list(server_args))
    try:
        with grpc.insecure_channel(server.target) as channel:
            call = channel.unary_unary(SCREEN, response_deserializer=pb.ScreenResponse.FromString)
            if len(call(payload, timeout=120).results) != cfg.max_images_per_request:
                raise RuntimeError("the warm-up call did not screen every image")
            idle = rss_bytes(server.pid)
            codes, samples, elapsed = _drive(call, payload, callers, calls, server.pid)
        alive = server.proc.poll() is None
    finally:
        server.kill()
    peak = max([idle, *samples])
    growth = peak - idle
    return {
        "bundle": str(bundle),
        "input_shape": list(shape),
        "callers": callers,
        "calls_each": calls,
        "server_args": list(server_args),
        "request_bytes": len(payload),
        "receive_limit": cfg.receive_limit(shape),
        "max_request_memory_mb": cfg.max_request_memory_mb,
        "codes": dict(codes),
        "seconds": round(elapsed, 2),
        "idle_rss_mb": round(idle / 2**20, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "growth_mb": round(growth / 2**20, 1),
        "bound_mb": round(bound / 2**20, 1),
        "slack_mb": SLACK >> 20,
        "server_alive": alive,
        "within_bound": growth <= bound + SLACK,
        "internal_errors": codes.get("INTERNAL", 0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="models/default")
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the report here")
    p.add_argument(
        "server_args", nargs="*", help="more `pathguard serve` flags (after --), e.g. --max-request-memory-mb 128"
    )
    args = p.parse_args(argv)
    report = flood(args.bundle, args.callers, args.calls, args.threads, args.server_args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if report["within_bound"] and not report["internal_errors"] and report["server_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
