"""Serving benchmark: PathGuard over loopback vs in-process screening vs KServe's own Python server.

Measured in one run, on one machine, with the same torch thread count everywhere:

1. in process: median latency of ``Screener.screen`` on one image; throughput at batch 32;
2. ``pathguard serve`` (a subprocess): median latency of one image over loopback (own API), and the
   throughput and p50/p99 latency of ``--callers`` concurrent callers (one image per call) for the own API
   and for the KServe v2 protocol;
3. KServe's Python model server (``kserve`` package, v2 gRPC) serving the same screener
   (``bench/kserve_model.py``, started with ``--kserve-python``), driven by the same load generator and
   the same KServe requests.

Targets (issue 5): single-image latency <= 2x in process; 32 callers >= 60% of in-process batch-32
throughput. The load generator (grpc.aio, one channel per server) runs in this process.

    # once: KServe in its own venv (its protobuf pin conflicts with PathGuard's)
    python3 -m venv /tmp/kserve-venv && /tmp/kserve-venv/bin/pip install kserve
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m bench.serve_bench --bundle models/default --threads 2 \
        --kserve-python /tmp/kserve-venv/bin/python --json bench/results.json
    # no bundle at hand: --tiny DIR trains the small synthetic test bundle into DIR first
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from detector import load_bundle
from detector.runtime import set_threads
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc

from .helpers import REPO, ServerProcess, free_port, kserve_request, own_request, percentile, scrape

log = logging.getLogger("serve_bench")


@dataclass
class BenchConfig:
    bundle: str
    threads: int = 2  # torch threads, in process and in every server
    callers: int = 32  # concurrent callers of the load phases
    duration: float = 4.0  # seconds per load phase and round (after 1 s of warm-up load)
    single_calls: int = 200  # sequential single-image calls per contender, over all rounds
    rounds: int = 4
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    engine: str = "skipping"  # how the model runs, the same in process and in every server
    kserve_python: str | None = None  # interpreter with the kserve package; None skips KServe


def bench_images(bundle, n: int) -> np.ndarray:
    """Test images of the bundle's dataset when it can be loaded, else uniform noise."""
    try:
        from detector.data import load_dataset

        cfg = bundle.meta["train_config"]
        return load_dataset(cfg["dataset"], "test", cfg.get("data_root")).float_images(slice(0, n)).numpy()
    except Exception as exc:  # the timing does not depend on the pixels
        log.info("using noise images (%s)", exc)
        return np.random.default_rng(0).uniform(0, 1, (n, *bundle.input_shape)).astype(np.float32)


# -- one measurement each -------------------------------------------------------------------------
def time_calls(call, n: int) -> list[float]:
    """Seconds of ``n`` sequential calls of ``call()`` (after 5 unmeasured ones)."""
    for _ in range(5):
        call()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def in_process_throughput(screener, batch: torch.Tensor, seconds: float) -> float:
    """Images per second of back-to-back ``screen`` calls on ``batch``."""
    screener.screen(batch)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        screener.screen(batch)
        done += len(batch)
    return done / elapsed


async def _drive(target: str, method: str, requests: list, callers: int, duration: float,
                 warmup: float) -> tuple[float, list[float], int]:
    """``callers`` closed-loop callers for warmup + duration seconds: (calls/s, latencies of the measured
    calls in seconds, errors)."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=lambda b: b)
        latencies: list[float] = []
        errors = 0
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + duration

        async def caller(i: int) -> None:
            nonlocal errors
            k = i
            while (now := time.perf_counter()) < stop_at:
                try:
                    await call(requests[k % len(requests)], timeout=60)
                    if now >= measure_from:
                        latencies.append(time.perf_counter() - now)
                except grpc.aio.AioRpcError:
                    errors += 1
                k += callers

        await asyncio.gather(*(caller(i) for i in range(callers)))
        elapsed = time.perf_counter() - measure_from
    return len(latencies) / elapsed, latencies, errors


def batch_totals(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of pathguard_batch_size from the server's /metrics."""
    values = scrape(metrics_url)
    return values.get("pathguard_batch_size_sum", 0.0), values.get("pathguard_batch_size_count", 0.0)


# -- servers ------------------------------------------------------------------------------------------
class KServeProcess:
    """KServe's Python model server (``bench/kserve_model.py``) in a subprocess; waits for ServerReady."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path) -> None:
        self.name, self.port = name, port
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        self.target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        with grpc.insecure_channel(self.target) as channel:
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {self.proc.returncode}; see {log_path}")
                try:
                    if stub.ServerReady(kserve_pb2.ServerReadyRequest(), timeout=2).ready:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready after 180 s; see {log_path}")
                time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# -- the run ------------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    value = percentile(values, q)
    return float("nan") if value is None else 1000 * value


# Over 60 lines on purpose: servers up, then rounds in which every contender is measured back to back (so
# ratios compare like with like under the same background load), then the medians and ratios.
def run(cfg: BenchConfig, out_dir: Path) -> dict:
    """Start the servers, then measure in rounds; each round measures every contender back to back, so that
    the ratios compare measurements taken under the same background load (this machine is shared)."""
    set_threads(cfg.threads)
    bundle = load_bundle(cfg.bundle)
    screener = bundle.screener(engine=cfg.engine)
    images = bench_images(bundle, 64)
    name = bundle.meta["name"]
    one, batch = torch.from_numpy(images[:1]), torch.from_numpy(images[:cfg.callers])
    own_reqs = [own_request(images[i:i + 1]) for i in range(len(images))]
    kserve_reqs = [kserve_request(images[i:i + 1], name) for i in range(len(images))]

    servers: dict[str, ServerProcess | KServeProcess] = {}
    try:
        pathguard = servers["pathguard"] = ServerProcess(
            cfg.bundle, cfg.threads, ["--max-batch-size", str(cfg.max_batch_size),
                                      "--max-queue-delay-ms", str(cfg.max_queue_delay_ms), "--engine", cfg.engine])
        metrics_url = pathguard.metrics_url
        if cfg.kserve_python:
            port = free_port()
            servers["kserve"] = KServeProcess(
                "kserve", [cfg.kserve_python, str(REPO / "bench" / "kserve_model.py"), "--bundle", cfg.bundle,
                           "--grpc-port", str(port), "--http-port", str(free_port()), "--threads", str(cfg.threads),
                           "--engine", cfg.engine, "--repo", str(REPO),
                           "--extra-site", sysconfig.get_paths()["purelib"]],
                port, out_dir / "kserve.log")
        load_before = os.getloadavg()
        channels = {k: grpc.insecure_channel(s.target) for k, s in servers.items()}
        singles = {"in_process": lambda: screener.screen(one),
                   "pathguard": lambda: pb_grpc.PathGuardStub(channels["pathguard"]).ScreenImages(own_reqs[0],
                                                                                                  timeout=60),
                   "pathguard_kserve": lambda: kserve_grpc.GRPCInferenceServiceStub(
                       channels["pathguard"]).ModelInfer(kserve_reqs[0], timeout=60)}
        loads = {"pathguard": ("pathguard", "/pathguard.v1.PathGuard/ScreenImages", own_reqs),
                 "pathguard_kserve": ("pathguard", "/inference.GRPCInferenceService/ModelInfer", kserve_reqs)}
        if "kserve" in servers:
            singles["kserve"] = lambda: kserve_grpc.GRPCInferenceServiceStub(channels["kserve"]).ModelInfer(
                kserve_reqs[0], timeout=60)
            loads["kserve"] = ("kserve", "/inference.GRPCInferenceService/ModelInfer", kserve_reqs)

        rounds = []
        for r in range(cfg.rounds):
            log.info("round %d/%d", r + 1, cfg.rounds)
            rnd: dict = {"single": {}, "throughput": {}, "latency": {}, "errors": {}}
            for key, call in singles.items():
                rnd["single"][key] = time_calls(call, max(10, cfg.single_calls // cfg.rounds))
            rnd["throughput"]["in_process"] = in_process_throughput(screener, batch, cfg.duration)
            before = batch_totals(metrics_url)
            for key, (server, method, reqs) in loads.items():
                rate, lat, errors = asyncio.run(_drive(servers[server].target, method, reqs, cfg.callers,
                                                       cfg.duration, warmup=1.0))
                rnd["throughput"][key], rnd["latency"][key], rnd["errors"][key] = rate, lat, errors
            after = batch_totals(metrics_url)
            rnd["pathguard_mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            rounds.append(rnd)
        for channel in channels.values():
            channel.close()
    finally:
        for server in servers.values():
            server.stop()

    def median_of(f) -> float:
        return float(np.median([f(rnd) for rnd in rounds]))

    single = {k: {"median_ms": median_of(lambda rnd, k=k: 1000 * np.median(rnd["single"][k])),
                  "p99_ms": _pct([x for rnd in rounds for x in rnd["single"][k]], 99)} for k in singles}
    load = {k: {"images_per_s": median_of(lambda rnd, k=k: rnd["throughput"][k])} for k in ["in_process", *loads]}
    for k in loads:
        pooled = [x for rnd in rounds for x in rnd["latency"][k]]
        load[k].update(p50_ms=_pct(pooled, 50), p99_ms=_pct(pooled, 99),
                       errors=sum(rnd["errors"][k] for rnd in rounds))
    load["pathguard"]["mean_batch"] = median_of(lambda rnd: rnd["pathguard_mean_batch"])

    def ratio(f) -> dict:
        values = [f(rnd) for rnd in rounds]
        return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}

    ratios = {
        "single_latency_vs_in_process": ratio(lambda rnd: np.median(rnd["single"]["pathguard"])
                                              / np.median(rnd["single"]["in_process"])),
        "throughput_vs_in_process_batch": ratio(lambda rnd: rnd["throughput"]["pathguard"]
                                                / rnd["throughput"]["in_process"]),
    }
    if "kserve" in loads:
        ratios["throughput_vs_kserve"] = ratio(lambda rnd: rnd["throughput"]["pathguard_kserve"]
                                               / rnd["throughput"]["kserve"])
    return {"config": asdict(cfg),
            "bundle": {"path": cfg.bundle, "name": name, "arch": bundle.meta["arch"],
                       "input_shape": list(bundle.input_shape)},
            "machine": {"cpus": os.cpu_count(), "load_average_start": load_before, "load_average_end": os.getloadavg()},
            "single": single, "load": load, "ratios": ratios}


LABELS = {"in_process": "in process (Screener.screen)", "pathguard": "PathGuard, own API",
          "pathguard_kserve": "PathGuard, KServe v2 protocol", "kserve": "KServe Python server, KServe v2"}


def report(r: dict) -> str:
    c, m = r["config"], r["machine"]
    lines = [f"bundle {r['bundle']['path']} ({r['bundle']['arch']}, input {r['bundle']['input_shape']}); "
             f"{c['threads']} torch threads and the {c['engine']} engine everywhere; {c['rounds']} rounds; "
             f"{os.cpu_count()} CPUs, "
             f"load average {m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}", "",
             "| 1 image, sequential | median ms | p99 ms |", "|---|---|---|"]
    for k, v in r["single"].items():
        lines.append(f"| {LABELS[k]} | {v['median_ms']:.2f} | {v['p99_ms']:.2f} |")
    lines += ["", f"| {c['callers']} concurrent callers, 1 image per call (in process: batches of {c['callers']}) "
                  "| images/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
    for k, v in r["load"].items():
        if k == "in_process":
            lines.append(f"| {LABELS[k]} | {v['images_per_s']:.0f} | | | |")
        else:
            lines.append(f"| {LABELS[k]} | {v['images_per_s']:.0f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
                         f"{v['errors']} |")
    ratios = r["ratios"]

    def fmt(x: dict, scale: float = 1.0, unit: str = "x") -> str:
        return (f"{scale * x['median']:.2f}{unit} (rounds: {scale * x['min']:.2f}-{scale * x['max']:.2f})"
                if unit == "x" else f"{scale * x['median']:.0f}{unit} (rounds: {scale * x['min']:.0f}-"
                f"{scale * x['max']:.0f}{unit})")

    lines += ["", f"mean PathGuard batch under load: {r['load']['pathguard']['mean_batch']:.1f} images",
              f"single-image latency, PathGuard / in process: {fmt(ratios['single_latency_vs_in_process'])} "
              "(target <= 2x)",
              f"{c['callers']}-caller throughput / in-process batch {c['callers']}: "
              f"{fmt(ratios['throughput_vs_in_process_batch'], 100, '%')} (target >= 60%)"]
    if "throughput_vs_kserve" in ratios:
        lines.append(f"throughput, PathGuard / KServe server (same KServe v2 requests and load): "
                     f"{fmt(ratios['throughput_vs_kserve'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle to serve (default: models/default)")
    parser.add_argument("--tiny", metavar="DIR", help="train the small synthetic test bundle into DIR and use it")
    parser.add_argument("--threads", type=int, default=BenchConfig.threads)
    parser.add_argument("--callers", type=int, default=BenchConfig.callers)
    parser.add_argument("--duration", type=float, default=BenchConfig.duration)
    parser.add_argument("--single-calls", type=int, default=BenchConfig.single_calls)
    parser.add_argument("--rounds", type=int, default=BenchConfig.rounds)
    parser.add_argument("--max-queue-delay-ms", type=float, default=BenchConfig.max_queue_delay_ms)
    parser.add_argument("--engine", choices=("skipping", "masked"), default=BenchConfig.engine,
                        help="how the model runs, in process and in every server (default: the server's default)")
    parser.add_argument("--kserve-python", help="python of a venv with kserve installed (omit to skip KServe)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--logs", default="/tmp/pathguard-bench", help="folder for the servers' logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bundle = args.bundle or str(REPO / "models" / "default")
    if args.tiny:
        from tests.synthetic import make_bundle  # python -m bench.serve_bench runs from the repository root

        bundle_dir = Path(args.tiny) / "bundle"
        bundle = str(bundle_dir if (bundle_dir / "bundle.json").is_file() else make_bundle(Path(args.tiny)))
    cfg = BenchConfig(bundle=bundle, threads=args.threads, callers=args.callers, duration=args.duration,
                      single_calls=args.single_calls, rounds=args.rounds, max_queue_delay_ms=args.max_queue_delay_ms,
                      kserve_python=args.kserve_python, engine=args.engine)
    out_dir = Path(args.logs)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run(cfg, out_dir)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
