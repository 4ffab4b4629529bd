"""Serving benchmark a skeptic accepts: cores pinned, server CPU per call, real images, batching peers.

On a 2-core machine, in one run, in rounds (each round measures every contender back to back, so ratios
compare measurements taken under the same background load):

* **in process** (this process pinned to core 0, ``--threads`` torch threads): one image at a time (latency),
  batches of 32, and batches of the mean size the server actually formed in the same round; also the
  model's CPU time per image at that batch size;
* **PathGuard, 1 worker** (``pathguard serve`` pinned to core 0): one image at a time over loopback from this
  process on core 1 (latency), then ``--callers`` closed-loop callers, one real test image per call, from an
  independent KServe v2 client (``tritonclient.grpc.aio``, ``bench/kserve_driver.py``) pinned to core 1; the
  server's CPU time per call is read from /proc over the measured window;
* **PathGuard, 2 workers** (``--workers 2``, both cores) driven the same way by a client that shares the two
  cores with it (there is no third core);
* **Seldon MLServer** with adaptive batching (``max_batch_size`` 32, ``max_batch_time`` = our queue delay),
  serving the same screener (``bench/mlserver_model.py``) with the same threads on core 0;
* **KServe's Python server** (no batching) serving the same screener on core 0.

With ``--py-spy`` the PathGuard server is also sampled under the same load (in a window of its own, not
timed) and its CPU time per call is split by stage (decode, validate, queue, compute, metrics, encode, and
gRPC/asyncio's own work) in proportion to the samples.

    python3 -m venv /tmp/mlserver-venv && /tmp/mlserver-venv/bin/pip install mlserver
    python3 -m venv /tmp/kserve-venv && /tmp/kserve-venv/bin/pip install kserve
    python3 -m venv /tmp/pyspy-venv && /tmp/pyspy-venv/bin/pip install py-spy
    .venv/bin/python -m bench.serve_cost --bundle models/default \
        --mlserver /tmp/mlserver-venv/bin/mlserver --kserve-python /tmp/kserve-venv/bin/python \
        --py-spy /tmp/pyspy-venv/bin/py-spy --json reports/service/serve_cost.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import torch

from bench.helpers import REPO, free_port, kserve_request, loopback_serve_args, sample, scrape
from detector import load_bundle
from detector.runtime import set_threads
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc

log = logging.getLogger("serve_cost")

SERVER_CORE, CLIENT_CORE = 0, 1


@dataclass
class CostConfig:
    bundle: str
    threads: int = 1  # torch threads per server process and in process
    callers: int = 32
    duration: float = 5.0  # measured seconds per load phase and round
    rounds: int = 3
    single_calls: int = 100  # sequential one-image calls per round (latency)
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    engine: str = "skipping"
    mlserver: str | None = None  # the `mlserver` executable of its venv; None skips MLServer
    kserve_python: str | None = None  # python of a venv with kserve; None skips KServe
    py_spy: str | None = None  # py-spy executable; None skips the stage profile
    workers: int = 2  # the multi-worker contender (0 skips it)
    one_process_both_cores: bool = True  # also 1 worker with 2 torch threads on both cores (choosing the default)


# -- images, ports, processes ---------------------------------------------------------------------------
def test_images(bundle, n: int) -> np.ndarray:
    """The first ``n`` test images of the bundle's dataset (real images: the skipping engine's cost depends on
    them). No fallback to noise."""
    from detector.data import load_dataset

    cfg = bundle.meta["train_config"]
    return load_dataset(cfg["dataset"], "test", cfg.get("data_root")).float_images(slice(0, n)).numpy()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(p) for p in text]
    return out


class Contender:
    """A server subprocess pinned to ``cores``, ready when KServe ServerReady answers true."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        cores: str,
        log_path: Path,
        env: dict | None = None,
        cwd: Path = REPO,
        ready_servers: int = 1,
    ) -> None:
        self.name, self.port, self.target = name, port, f"127.0.0.1:{port}"
        self.metrics_url: str | None = None  # PathGuard's /metrics, when known
        self._log = open(log_path, "w")
        full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            ["taskset", "-c", cores, *cmd], env=full_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd
        )
        deadline = time.monotonic() + 300
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
                    raise RuntimeError(f"{name} not ready after 300 s; see {log_path}")
                time.sleep(0.5)
        if ready_servers > 1:  # every worker loaded its model (each logs "ready:")
            while log_path.read_text().count("ready:") < ready_servers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: not every worker ready; see {log_path}")
                time.sleep(0.5)

    def server_pids(self) -> list[int]:
        """The processes doing the serving: the workers under a supervisor, else the process itself."""
        kids = children(self.proc.pid)
        return kids if self.name.startswith("pathguard_workers") and kids else [self.proc.pid]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def drive(
    target: str,
    model: str,
    images_path: Path,
    callers: int,
    duration: float,
    pids: list[int],
    cores: str | None,
    connections: int = 1,
) -> dict:
    """``bench/kserve_driver.py`` in its own process (pinned to ``cores`` when given)."""
    cmd = [
        sys.executable,
        str(REPO / "bench" / "kserve_driver.py"),
        "--target",
        target,
        "--model",
        model,
        "--images",
        str(images_path),
        "--callers",
        str(callers),
        "--duration",
        str(duration),
        "--connections",
        str(connections),
        "--pid",
        *map(str, pids),
    ]
    if cores is not None:
        cmd = ["taskset", "-c", cores, *cmd]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if out.returncode != 0:
        raise RuntimeError(f"driver failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def batch_totals(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of pathguard_batch_size from the server's /metrics."""
    metrics = scrape(metrics_url)
    return sample(metrics, "pathguard_batch_size_sum"), sample(metrics, "pathguard_batch_size_count")


# -- in process -----------------------------------------------------------------------------------------
def in_process(screener, images: torch.Tensor, batch: int, seconds: float) -> dict:
    """Back-to-back ``screen`` calls on consecutive batches of real images: images/s and CPU µs per image."""
    screener.screen(images[:batch])
    done, i = 0, 0
    start, cpu0 = time.perf_counter(), time.thread_time()
    while (elapsed := time.perf_counter() - start) < seconds:
        lo = (i * batch) % (len(images) - batch + 1)
        screener.screen(images[lo : lo + batch])
        done, i = done + batch, i + 1
    cpu = time.thread_time() - cpu0
    return {"batch": batch, "images_per_s": done / elapsed, "cpu_us_per_image": 1e6 * cpu / done}


def single_latencies(call, n: int) -> list[float]:
    for i in range(5):
        call(i)
    out = []
    for i in range(n):
        t = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - t)
    return out


# -- stage profile --------------------------------------------------------------------------------------
# (stage, test on one py-spy frame "function (file:line)"), tried from the innermost frame outwards: the first
# frame that matches decides the sample's stage.
STAGE_RULES: list[tuple[str, callable]] = [
    ("metrics", lambda f: "prometheus_client/" in f or "service/metrics.py" in f),
    ("compute", lambda f: f.startswith(("Screener.screen ", "ModelRuntime.screen ")) or "/detector/" in f),
    ("validate", lambda f: "service/codec.py" in f or f.startswith("ScreeningService.check_model")),
    (
        "decode",
        lambda f: f.startswith(
            (
                "_parse ",
                "_parsed_stream ",
                "InferenceServicer._images ",
                "PathGuardServicer._images ",
                "InferenceServicer._requested_outputs ",
            )
        ),
    ),
    ("encode", lambda f: f.startswith(("_image_results ", "_kserve_response ", "_serialize "))),
    (
        "queue",
        lambda f: (
            "service/batching.py" in f
            or "service/runtime.py" in f
            or f.startswith(("ScreeningService.screen ", "ScreeningService.arriving "))
        ),
    ),
    ("handler", lambda f: "service/interceptors.py" in f or "service/servicers.py" in f),
]


def classify(stack: list[str], thread: str) -> str:
    """The stage of one sample; "idle" for a thread waiting in select/poll (py-spy's idle detection misses
    some of those on a loaded machine)."""
    if stack and stack[-1].startswith(("EpollSelector.select ", "_PollLikeSelector.select ", "Condition.wait ")):
        return "idle"
    for frame in reversed(stack):
        for stage, test in STAGE_RULES:
            if test(frame):
                return stage
    if "pathguard-batcher" in thread:
        return "queue"
    if "serve_forever" in thread or "metrics" in thread:
        return "metrics"
    return "grpc_asyncio"


def profile_stages(py_spy: str, target: str, pid: int, images_path: Path, cfg: CostConfig, out: Path) -> dict:
    """Sample the server with py-spy under the load (in a window that is not timed: py-spy pauses the server
    briefly for every sample, so that the stack and thread state it reads are consistent); the share of
    working samples per stage."""
    raw = out / "pathguard.pyspy.txt"
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(cfg.duration + 2)),
            "-r",
            "200",
            "--threads",
            "--format",
            "raw",
            "-o",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    drive(target, "pathguard", images_path, cfg.callers, cfg.duration, [pid], str(CLIENT_CORE))
    spy.wait(60)
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        counts[classify(frames[1:], frames[0])] += int(n)
    idle = counts.pop("idle", 0)
    total = sum(counts.values())
    return {"samples": total, "idle_samples_dropped": idle, "share": {k: v / total for k, v in counts.most_common()}}


# -- the run --------------------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return float(np.median(values))


def _start_pathguard(
    cfg: CostConfig, out: Path, key: str, threads: int, cores: str, *extra: str, workers: int = 1
) -> Contender:
    """``pathguard serve`` with the run's batching and engine (and ``extra`` flags), pinned to ``cores``."""
    port, metrics_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "pathguard",
        *loopback_serve_args(cfg.bundle, threads, port, metrics_port),
        "--max-batch-size",
        str(cfg.max_batch_size),
        "--max-queue-delay-ms",
        str(cfg.max_queue_delay_ms),
        "--engine",
        cfg.engine,
        *extra,
    ]
    contender = Contender(key, cmd, port, cores, out / f"{key}.log", ready_servers=workers)
    contender.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return contender


def _start_kserve(cfg: CostConfig, out: Path) -> Contender:
    """KServe's Python server (``bench/kserve_model.py``, no batching), the same screener, on core 0."""
    port = free_port()
    cmd = [
        cfg.kserve_python,
        str(REPO / "bench" / "kserve_model.py"),
        "--bundle",
        cfg.bundle,
        "--grpc-port",
        str(port),
        "--http-port",
        str(free_port()),
        "--threads",
        str(cfg.threads),
        "--engine",
        cfg.engine,
        "--repo",
        str(REPO),
        "--extra-site",
        sysconfig.get_paths()["purelib"],
    ]
    return Contender("kserve", cmd, port, str(SERVER_CORE), out / "kserve.log")


def start_contenders(cfg: CostConfig, out: Path) -> dict[str, Contender]:
    """Every server of the run, each pinned to its cores, all ready (stopped by the caller)."""
    contenders: dict[str, Contender] = {}
    try:
        contenders["pathguard"] = _start_pathguard(cfg, out, "pathguard", cfg.threads, str(SERVER_CORE))
        both = f"{SERVER_CORE},{CLIENT_CORE}"
        if cfg.workers:
            contenders["pathguard_workers"] = _start_pathguard(
                cfg, out, "pathguard_workers", cfg.threads, both, "--workers", str(cfg.workers), workers=cfg.workers
            )
        if cfg.one_process_both_cores:
            contenders["pathguard_threads2"] = _start_pathguard(cfg, out, "pathguard_threads2", 2, both)
        if cfg.mlserver:
            contenders["mlserver"] = _start_mlserver(cfg, out)
        if cfg.kserve_python:
            contenders["kserve"] = _start_kserve(cfg, out)
    except BaseException:
        for c in contenders.values():
            c.stop()
        raise
    return contenders


class Round:
    """One round: every contender measured back to back."""

    def __init__(
        self,
        cfg: CostConfig,
        contenders: dict[str, Contender],
        screener,
        images: np.ndarray,
        images_path: Path,
        model: str,
    ) -> None:
        self.cfg, self.contenders, self.screener = cfg, contenders, screener
        self.x, self.images_path, self.model = torch.from_numpy(images), images_path, model
        self.requests = [kserve_request(images[i : i + 1], model=model) for i in range(64)]
        self.metrics_url = contenders["pathguard"].metrics_url

    def _drive(self, key: str, cores: str | None, connections: int = 1) -> dict:
        c = self.contenders[key]
        return drive(
            c.target,
            self.model,
            self.images_path,
            self.cfg.callers,
            self.cfg.duration,
            c.server_pids(),
            cores,
            connections,
        )

    def run(self) -> dict:
        cfg, x, rnd = self.cfg, self.x, {}
        os.sched_setaffinity(0, {SERVER_CORE})
        rnd["in_process_single_ms"] = 1000 * _median(
            single_latencies(lambda i: self.screener.screen(x[i % 64 : i % 64 + 1]), cfg.single_calls)
        )
        rnd["in_process_32"] = in_process(self.screener, x, 32, cfg.duration)
        os.sched_setaffinity(0, {CLIENT_CORE})
        with grpc.insecure_channel(self.contenders["pathguard"].target) as channel:
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)
            rnd["pathguard_single_ms"] = 1000 * _median(
                single_latencies(lambda i: stub.ModelInfer(self.requests[i % 64], timeout=30), cfg.single_calls)
            )
        before = batch_totals(self.metrics_url)
        rnd["pathguard"] = self._drive("pathguard", str(CLIENT_CORE))
        after = batch_totals(self.metrics_url)
        rnd["pathguard"]["mean_batch"] = mean_batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
        os.sched_setaffinity(0, {SERVER_CORE})
        rnd["in_process_mean_batch"] = in_process(self.screener, x, max(1, round(mean_batch)), cfg.duration)
        os.sched_setaffinity(0, {CLIENT_CORE})
        for key in ("mlserver", "kserve"):
            if key in self.contenders:
                rnd[key] = self._drive(key, str(CLIENT_CORE))
        # Scaling over cores: one connection per caller (SO_REUSEPORT spreads connections over the workers),
        # the base measured the same way on one core; both-core servers share the cores with the client.
        scaling = [k for k in ("pathguard_workers", "pathguard_threads2") if k in self.contenders]
        if scaling:
            rnd["pathguard_conns"] = self._drive("pathguard", str(CLIENT_CORE), connections=cfg.callers)
        for key in scaling:
            rnd[key] = self._drive(key, None, connections=cfg.callers)
        return rnd


def run(cfg: CostConfig, out: Path) -> dict:
    set_threads(cfg.threads)
    os.sched_setaffinity(0, {SERVER_CORE})
    bundle = load_bundle(cfg.bundle)
    screener = bundle.screener(engine=cfg.engine)
    images = test_images(bundle, 512)
    images_path = out / "images.npy"
    np.save(images_path, images)
    contenders = start_contenders(cfg, out)
    try:
        load_before = os.getloadavg()
        one_round = Round(cfg, contenders, screener, images, images_path, bundle.meta["name"])
        rounds = []
        for r in range(cfg.rounds):
            log.info("round %d/%d", r + 1, cfg.rounds)
            rounds.append(one_round.run())
            log.info(
                "round %d: %s",
                r + 1,
                json.dumps({k: v.get("images_per_s") if isinstance(v, dict) else v for k, v in rounds[-1].items()}),
            )
        stages = None
        if cfg.py_spy:
            pg = contenders["pathguard"]
            stages = profile_stages(cfg.py_spy, pg.target, pg.proc.pid, images_path, cfg, out)
    finally:
        for c in contenders.values():
            c.stop()
    return summarize(cfg, bundle, rounds, stages, load_before)


def _start_mlserver(cfg: CostConfig, out: Path) -> Contender:
    """MLServer with adaptive batching on, the same screener, inference in the server process, on core 0."""
    model_dir = Path(tempfile.mkdtemp(prefix="pathguard-mlserver-"))
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "pathguard",
                "implementation": "mlserver_model.PathGuardRuntime",
                "max_batch_size": cfg.max_batch_size,
                "max_batch_time": cfg.max_queue_delay_ms / 1000.0,
                "parameters": {"uri": str(Path(cfg.bundle).resolve())},
            }
        )
    )
    port = free_port()
    env = {
        "MLSERVER_GRPC_PORT": str(port),
        "MLSERVER_HTTP_PORT": str(free_port()),
        "MLSERVER_METRICS_PORT": str(free_port()),
        "MLSERVER_PARALLEL_WORKERS": "0",
        "MLSERVER_DEBUG": "false",
        "MLSERVER_METRICS_DIR": str(model_dir / ".metrics"),
        "PYTHONPATH": str(REPO / "bench"),
        "PATHGUARD_REPO": str(REPO),
        "PATHGUARD_EXTRA_SITE": sysconfig.get_paths()["purelib"],
        "PATHGUARD_THREADS": str(cfg.threads),
        "PATHGUARD_ENGINE": cfg.engine,
    }
    return Contender(
        "mlserver",
        [cfg.mlserver, "start", str(model_dir)],
        port,
        str(SERVER_CORE),
        out / "mlserver.log",
        env=env,
        cwd=model_dir,
    )


def _per_cpu_second(load: dict) -> float:
    return load["images"] / max(load["server_cpu_s"], 1e-9)


def _med(rounds: list[dict], f) -> float:
    """The median over the rounds of ``f(round)``."""
    return _median([f(r) for r in rounds])


def _spread(rounds: list[dict], f) -> dict:
    """Median, min and max over the rounds of ``f(round)``."""
    values = [f(r) for r in rounds]
    return {"median": _median(values), "min": float(min(values)), "max": float(max(values))}


def _load_table(rounds: list[dict]) -> dict:
    """Per server under load: median throughput, latencies and server CPU per call; errors summed."""
    med = partial(_med, rounds)
    servers = [
        k
        for k in ("pathguard", "mlserver", "kserve", "pathguard_conns", "pathguard_workers", "pathguard_threads2")
        if k in rounds[0]
    ]
    load = {
        k: {
            "images_per_s": med(lambda r, k=k: r[k]["images_per_s"]),
            "p50_ms": med(lambda r, k=k: r[k]["p50_ms"]),
            "p99_ms": med(lambda r, k=k: r[k]["p99_ms"]),
            "server_cpu_us_per_call": med(lambda r, k=k: r[k]["server_cpu_us_per_call"]),
            "errors": sum(sum(r[k]["errors"].values()) for r in rounds),
        }
        for k in servers
    }
    load["pathguard"]["mean_batch"] = med(lambda r: r["pathguard"]["mean_batch"])
    return load


def _ratios(rounds: list[dict], load: dict) -> dict:
    """PathGuard against in-process screening and every peer that ran, each ratio taken within a round."""
    spread = partial(_spread, rounds)
    ratios = {
        "throughput_vs_in_process_batch_32": spread(
            lambda r: r["pathguard"]["images_per_s"] / r["in_process_32"]["images_per_s"]
        ),
        "throughput_vs_in_process_mean_batch": spread(
            lambda r: r["pathguard"]["images_per_s"] / r["in_process_mean_batch"]["images_per_s"]
        ),
        "single_latency_vs_in_process": spread(lambda r: r["pathguard_single_ms"] / r["in_process_single_ms"]),
        # Images per CPU-second of the server's process vs of in-process screening: what the server would do
        # with its core to itself (other programs on a shared machine take wall-clock time, not CPU time).
        "cpu_normalized_vs_in_process_batch_32": spread(
            lambda r: _per_cpu_second(r["pathguard"]) * r["in_process_32"]["cpu_us_per_image"] / 1e6
        ),
    }
    if "pathguard_workers" in load:
        ratios["workers_vs_one_worker"] = spread(
            lambda r: r["pathguard_workers"]["images_per_s"] / r["pathguard_conns"]["images_per_s"]
        )
    if "pathguard_threads2" in load:
        ratios["threads2_vs_one_worker"] = spread(
            lambda r: r["pathguard_threads2"]["images_per_s"] / r["pathguard_conns"]["images_per_s"]
        )
    if "mlserver" in load:
        ratios["throughput_vs_mlserver"] = spread(
            lambda r: r["pathguard"]["images_per_s"] / r["mlserver"]["images_per_s"]
        )
        ratios["cpu_normalized_vs_mlserver"] = spread(
            lambda r: _per_cpu_second(r["pathguard"]) / _per_cpu_second(r["mlserver"])
        )
    if "kserve" in load:
        ratios["throughput_vs_kserve"] = spread(lambda r: r["pathguard"]["images_per_s"] / r["kserve"]["images_per_s"])
    return ratios


def summarize(cfg: CostConfig, bundle, rounds: list[dict], stages: dict | None, load_before) -> dict:
    med = partial(_med, rounds)
    load = _load_table(rounds)
    model_us = med(lambda r: r["in_process_mean_batch"]["cpu_us_per_image"])
    cpu_call = load["pathguard"]["server_cpu_us_per_call"]
    result = {
        "config": asdict(cfg),
        "bundle": {"path": cfg.bundle, "name": bundle.meta["name"], "arch": bundle.meta["arch"], "engine": cfg.engine},
        "images": "Fashion-MNIST test images 0-511 (real images, cycled)",
        "cores": {
            "server": SERVER_CORE,
            "client": CLIENT_CORE,
            "workers": "the 2-worker server and its client share both cores (no third core)",
        },
        "machine": {"cpus": os.cpu_count(), "load_average_start": load_before, "load_average_end": os.getloadavg()},
        "in_process": {
            "single_ms": med(lambda r: r["in_process_single_ms"]),
            "batch_32_images_per_s": med(lambda r: r["in_process_32"]["images_per_s"]),
            "mean_batch": med(lambda r: r["in_process_mean_batch"]["batch"]),
            "mean_batch_images_per_s": med(lambda r: r["in_process_mean_batch"]["images_per_s"]),
            "model_cpu_us_per_image_at_mean_batch": model_us,
        },
        "single": {"pathguard_ms": med(lambda r: r["pathguard_single_ms"])},
        "load": load,
        "per_call": {"server_cpu_us": cpu_call, "model_cpu_us": model_us, "beyond_model_cpu_us": cpu_call - model_us},
        "ratios": _ratios(rounds, load),
        "rounds": rounds,
    }
    if stages:
        result["stages"] = {**stages, "cpu_us_per_call": {k: v * cpu_call for k, v in stages["share"].items()}}
    return result


LABELS = {
    "pathguard": "PathGuard, 1 worker, core 0 (dynamic batching)",
    "pathguard_conns": "PathGuard, 1 worker, core 0, one connection per caller",
    "pathguard_workers": "PathGuard, 2 workers x 1 thread, cores 0+1 shared with the client, one connection per caller",
    "pathguard_threads2": "PathGuard, 1 worker x 2 threads, cores 0+1 shared with the client, one connection "
    "per caller",
    "mlserver": "Seldon MLServer, core 0 (adaptive batching)",
    "kserve": "KServe Python server, core 0 (no batching)",
}


def report(r: dict) -> str:
    c, ip, ratios = r["config"], r["in_process"], r["ratios"]
    lines = [
        f"bundle {r['bundle']['path']} ({r['bundle']['arch']}), engine {r['bundle']['engine']}, "
        f"{c['threads']} torch thread(s) per process; {r['images']}; {c['rounds']} rounds of {c['duration']} s; "
        f"client: tritonclient.grpc.aio, {c['callers']} callers on one connection (unless said), 1 image "
        f"per call, pinned to core "
        f"{r['cores']['client']}; load average {r['machine']['load_average_start'][0]:.1f} -> "
        f"{r['machine']['load_average_end'][0]:.1f}",
        "",
        "| contender | images/s | p50 ms | p99 ms | server CPU µs/call |",
        "|---|---|---|---|---|",
        f"| in process, batches of 32, core 0 | {ip['batch_32_images_per_s']:.0f} | | | |",
        f"| in process, batches of {ip['mean_batch']:.0f} (PathGuard's mean batch), core 0 | "
        f"{ip['mean_batch_images_per_s']:.0f} | | | {ip['model_cpu_us_per_image_at_mean_batch']:.0f} (model) |",
    ]
    for k, v in r["load"].items():
        lines.append(
            f"| {LABELS[k]} | {v['images_per_s']:.0f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
            f"{v['server_cpu_us_per_call']:.0f} |"
        )

    def fmt(x: dict, pct: bool = False) -> str:
        if pct:
            return f"{100 * x['median']:.0f}% (rounds {100 * x['min']:.0f}-{100 * x['max']:.0f}%)"
        return f"{x['median']:.2f}x (rounds {x['min']:.2f}-{x['max']:.2f})"

    lines += [
        "",
        f"one image, sequential: in process {ip['single_ms']:.2f} ms, PathGuard over loopback "
        f"{r['single']['pathguard_ms']:.2f} ms = {fmt(ratios['single_latency_vs_in_process'])}",
        f"32 callers / in-process batch 32: {fmt(ratios['throughput_vs_in_process_batch_32'], True)} "
        f"(per CPU-second: {fmt(ratios['cpu_normalized_vs_in_process_batch_32'], True)}); "
        f"/ in-process batch {ip['mean_batch']:.0f}: {fmt(ratios['throughput_vs_in_process_mean_batch'], True)}",
        f"server CPU per one-image call {r['per_call']['server_cpu_us']:.0f} µs = model "
        f"{r['per_call']['model_cpu_us']:.0f} µs + {r['per_call']['beyond_model_cpu_us']:.0f} µs beyond it",
    ]
    for key, label in (
        ("workers_vs_one_worker", "2 workers / 1 worker on 1 core (one connection per caller)"),
        ("threads2_vs_one_worker", "1 worker x 2 threads / 1 worker on 1 core"),
        ("throughput_vs_mlserver", "/ MLServer"),
        ("cpu_normalized_vs_mlserver", "/ MLServer, images per server CPU-second"),
        ("throughput_vs_kserve", "/ KServe"),
    ):
        if key in ratios:
            lines.append(f"PathGuard {label}: {fmt(ratios[key])}")
    if "stages" in r:
        lines += ["", "server CPU µs per call by stage (py-spy samples x CPU per call):"]
        lines += [f"  {k:<13} {v:7.0f}" for k, v in r["stages"]["cpu_us_per_call"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(REPO / "models" / "default"))
    for f in (
        "threads",
        "callers",
        "duration",
        "rounds",
        "single_calls",
        "max_batch_size",
        "max_queue_delay_ms",
        "workers",
    ):
        default = getattr(CostConfig, f)
        parser.add_argument("--" + f.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--engine", choices=("skipping", "masked"), default=CostConfig.engine)
    parser.add_argument("--mlserver", help="`mlserver` executable of its venv (omit to skip MLServer)")
    parser.add_argument("--kserve-python", help="python of a venv with kserve (omit to skip KServe)")
    parser.add_argument("--py-spy", help="py-spy executable (omit to skip the stage profile)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--logs", default="/tmp/pathguard-serve-cost", help="folder for the servers' logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if (os.cpu_count() or 1) < 2:
        parser.error("needs 2 cores: one for the server, one for the client")
    cfg = CostConfig(**{k: v for k, v in vars(args).items() if k in CostConfig.__dataclass_fields__})
    out = Path(args.logs)
    out.mkdir(parents=True, exist_ok=True)
    result = run(cfg, out)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
