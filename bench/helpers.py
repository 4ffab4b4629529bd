"""What the benchmarks and the service tests share: a ``pathguard serve`` subprocess, request builders,
``/metrics`` scraping, percentiles, memory readings and channel options."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.pathguard.v1 import pathguard_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
# Larger than any request here: a limit that the client hits first would hide the server's own answer.
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20))
_READY = re.compile(r"listening on [^ ]+:(\d+) .*metrics on :(\d+)/metrics")


# -- the server under test ---------------------------------------------------------------------------------
def loopback_serve_args(bundle: str | Path, threads: int, port: int = 0, metrics_port: int = 0) -> list[str]:
    """``pathguard serve`` arguments (after the program) for a server on loopback; port 0 picks a free one."""
    return [
        "serve",
        "--bundle",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--threads",
        str(threads),
    ]


class ServerProcess:
    """``pathguard serve`` on loopback (free ports) in a subprocess, its log collected line by line.

    Its ``--bundle`` is a symlink this object owns, so that :meth:`point_to` can swap the bundle under a
    running server (as a mounted volume's symlink swap does) before a SIGHUP reload.
    """

    def __init__(
        self, bundle: str | Path, threads: int = 1, args: list[str] | tuple[str, ...] = (), start_timeout: float = 180.0
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="pathguard-serve-"))
        self.bundle_link = self.workdir / "bundle"
        self.bundle_link.symlink_to(Path(bundle).resolve())
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = [sys.executable, "-m", "pathguard", *loopback_serve_args(self.bundle_link, threads), *args]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + start_timeout
        while not self.find("ready:") and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        match = _READY.search(self.log)
        if not self.find("ready:") or match is None:
            self.kill()
            raise RuntimeError(f"pathguard serve did not become ready (exit {self.proc.poll()}):\n{self.log}")
        self.port, self.metrics_port = int(match[1]), int(match[2])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line)

    @property
    def log(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def find(self, text: str, after: int = 0) -> str | None:
        """The first log line from line ``after`` on that contains ``text``."""
        with self._lock:
            return next((line for line in self.lines[after:] if text in line), None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def point_to(self, bundle: str | Path) -> None:
        """Swap the bundle the server reloads from, atomically."""
        tmp = self.workdir / "bundle.new"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(bundle).resolve())
        os.replace(tmp, self.bundle_link)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the server drains), then SIGKILL if it has not exited within ``timeout`` seconds."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- requests ----------------------------------------------------------------------------------------------
def own_request(images: np.ndarray) -> pb.ScreenRequest:
    """A ``ScreenImages`` request carrying ``images`` (N, C, H, W) float32 as a raw tensor."""
    return pb.ScreenRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=list(images.shape), data=images.tobytes()))


def kserve_request(
    images: np.ndarray, model: str = "pathguard", datatype: str = "FP32", name: str = "images", raw: bytes | None = None
) -> kserve_pb2.ModelInferRequest:
    """A KServe v2 ``ModelInfer`` request; ``datatype``, ``name`` and ``raw`` let a caller make it wrong."""
    req = kserve_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype=datatype, shape=list(images.shape))
    req.raw_input_contents.append(images.tobytes() if raw is None else raw)
    return req


def random_images(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


# -- what the server says ----------------------------------------------------------------------------------
def scrape(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Prometheus text over HTTP as {"name{labels}": value} (labels as exposed)."""
    text = urllib.request.urlopen(url, timeout=timeout).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def sample(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Value of one sample; 0 when absent. Labels must match exactly (in any order)."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and set(filter(None, re.split(r",(?=[a-z_]+=)", rest.rstrip("}")))) == want:
            return value
    return 0.0


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process from /proc/<pid>/status (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- figures -----------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), None for no values."""
    return float(np.percentile(values, q)) if values else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def emit_json(result: dict, path: str | Path | None) -> None:
    """Print a benchmark's result as JSON and, when ``path`` is given, write it there too (parents created)."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
