"""Closed-loop load from an independent KServe v2 client (``tritonclient.grpc.aio``), in its own process.

Started by ``bench/serve_cost.py`` pinned to its own core(s) (``taskset``); prints one JSON object. Each of
``--callers`` callers sends one request (``--per-call`` real test images) at a time, back to back; after
``--warmup`` seconds the calls finished during the next ``--duration`` seconds are measured, and so is the
CPU time the server processes (``--pid``, read from /proc) used in exactly that window.

tritonclient and PathGuard's generated ``inference`` protos cannot live in one Python process (duplicate
descriptor symbols), which is one reason this runs apart from the benchmark that starts it.

    .venv/bin/python bench/kserve_driver.py --target 127.0.0.1:50051 --model pathguard --images x.npy \
        --callers 32 --duration 5 --pid 1234
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (and their reaped children, none here), seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _requests(tc, images: np.ndarray, per_call: int) -> list:
    """KServe ``InferInput``s of ``per_call`` consecutive images each, the requests the callers cycle through."""
    inputs = []
    for i in range(0, len(images) - per_call + 1, per_call):
        x = np.ascontiguousarray(images[i : i + per_call], dtype=np.float32)
        inp = tc.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        inputs.append(inp)
    return inputs


def _summary(
    latencies: list[float], done: int, per_call: int, elapsed: float, server_cpu: float, errors: dict[str, int]
) -> dict:
    """The printed result: throughput, latency percentiles and the server's CPU time per call in the window."""
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "calls": done,
        "images": done * per_call,
        "seconds": elapsed,
        "calls_per_s": done / elapsed,
        "images_per_s": done * per_call / elapsed,
        "p50_ms": 1000 * float(np.percentile(lat, 50)),
        "p99_ms": 1000 * float(np.percentile(lat, 99)),
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_call": 1e6 * server_cpu / max(done, 1),
        "errors": errors,
    }


async def drive(args: argparse.Namespace) -> dict:
    import tritonclient.grpc.aio as tc

    inputs = _requests(tc, np.load(args.images), args.per_call)
    # --connections connections, callers spread over them (a local subchannel pool per channel: grpc would
    # otherwise share one connection between channels to the same target). SO_REUSEPORT spreads connections,
    # not calls, over the workers of `pathguard serve --workers N`, so that comparison needs many.
    clients = [
        tc.InferenceServerClient(args.target, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.connections)
    ]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    measuring, stop = False, False
    done = 0

    async def caller(i: int) -> None:
        nonlocal done
        k = i
        while not stop:
            start = time.perf_counter()
            try:
                await clients[i % len(clients)].infer(args.model, [inputs[k % len(inputs)]], client_timeout=60)
            except Exception as exc:  # InferenceServerException: count by its status
                status = exc.status() if hasattr(exc, "status") else None
                key = status or type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
                await asyncio.sleep(0.01)
            else:
                if measuring:
                    latencies.append(time.perf_counter() - start)
                    done += 1
            k += args.callers

    try:
        for c in clients:  # every connection is up and the server answers before the clock starts
            await c.infer(args.model, [inputs[0]], client_timeout=120)
        tasks = [asyncio.ensure_future(caller(i)) for i in range(args.callers)]
        await asyncio.sleep(args.warmup)
        measuring, cpu0, t0 = True, cpu_seconds(args.pid), time.perf_counter()
        await asyncio.sleep(args.duration)
        measuring, cpu1, t1 = False, cpu_seconds(args.pid), time.perf_counter()
        stop = True
        await asyncio.gather(*tasks)
    finally:
        for c in clients:
            await c.close()
    return _summary(latencies, done, args.per_call, t1 - t0, cpu1 - cpu0, errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", default="pathguard")
    parser.add_argument("--images", required=True, help=".npy (N, C, H, W) float32 in [0, 1]")
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--per-call", type=int, default=1)
    parser.add_argument("--connections", type=int, default=1, help="connections the callers share (1: one channel)")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--pid", type=int, nargs="*", default=[], help="server processes whose CPU time to read")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(drive(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
