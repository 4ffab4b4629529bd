"""``pathguard serve --workers N``: N server processes on one port, one supervisor, one /metrics.

Python runs one thread of Python at a time, so one server process keeps one core busy at most with its
per-call work; like KServe's workers or Triton's instance groups, N processes scale it across cores. Each
worker is a whole :class:`~service.server.PathGuardServer` (its own model copy, batcher and torch threads)
bound to the same port with ``SO_REUSEPORT``: the kernel spreads new connections over the workers (a
client's channel is one connection, so it stays with one worker; many clients spread).

The supervisor (this module, the process ``pathguard serve`` started):

* starts the workers, restarts one that dies unexpectedly (logged), and exits 0 after a clean drain;
* SIGTERM/SIGINT: forwards SIGTERM, so every worker turns health NOT_SERVING and drains its accepted calls
  within the grace period as one process does; exits 0 when all exited 0, 1 otherwise;
* SIGHUP: forwards it, so every worker reloads the bundle (each keeps its old model if the new one is broken);
* serves ``/metrics``: the workers' PathGuard metrics summed (prometheus-client multiprocess mode, files in
  a temporary ``PROMETHEUS_MULTIPROC_DIR``), each worker's CPU time and resident memory by ``worker``
  label, the number of live workers, and its own process and platform collectors;
* serves the probes ``/healthz`` and ``/readyz`` on the same port (:class:`WorkerProbes`): live while every
  worker runs and calls itself live, ready when every worker is ready (each worker writes its probes to a
  file next to the metrics files).

A worker exits when its supervisor dies, even by SIGKILL (:func:`exit_with_parent`: ``PR_SET_PDEATHSIG`` on
Linux, and a thread that watches the parent pid), so no orphan keeps holding the port.

Health and the KServe readiness RPCs are answered by whichever worker the connection reached; a worker
turns SERVING only once its own model is loaded.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

from .config import ServeConfig

log = logging.getLogger(__name__)

_WORKER_ENV = "PATHGUARD_WORKER_CONFIG"
_PARENT_ENV = "PATHGUARD_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1
# A worker that dies within this many seconds of its start is not restarted (a broken bundle, a bad flag):
# the supervisor stops and exits 1 instead of restarting it in a loop.
MIN_UPTIME_FOR_RESTART = 30.0


def worker_threads(config: ServeConfig, workers: int) -> int:
    """Torch threads per worker: the configured number, or the CPU quota shared out (at least 1)."""
    if config.threads:
        return config.threads
    from detector.runtime import available_cpus

    return max(1, available_cpus() // workers)


def resolve_workers(config: ServeConfig) -> int:
    """``workers`` 0 means one per CPU this container may use."""
    if config.workers:
        return config.workers
    from detector.runtime import available_cpus

    return available_cpus()


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on ``port`` (0: a free one), held while the workers run so
    that no other program takes the port between their binds; it never accepts connections."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class _WorkerCollector:
    """``pathguard_worker_cpu_seconds_total`` and ``pathguard_worker_resident_memory_bytes`` by worker, read
    from /proc, and ``pathguard_workers`` (live workers)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cpu = CounterMetricFamily("pathguard_worker_cpu_seconds", "CPU time of each worker process.", labels=["worker"])
        rss = GaugeMetricFamily(
            "pathguard_worker_resident_memory_bytes", "Resident memory of each worker process.", labels=["worker"]
        )
        live = 0
        ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        for index, proc in list(self._supervisor.procs.items()):
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            live += 1
            cpu.add_metric([str(index)], (int(fields[11]) + int(fields[12])) / ticks)
            rss.add_metric([str(index)], int(fields[21]) * page)
        yield cpu
        yield rss
        yield GaugeMetricFamily("pathguard_workers", "Worker processes running.", value=live)


class WorkerProbes:
    """The supervisor's ``/healthz`` and ``/readyz``: what its workers' probes say (read from their files)."""

    def __init__(self, supervisor: Supervisor, probe_dir: str) -> None:
        self._supervisor, self._dir = supervisor, probe_dir

    def _states(self) -> list[tuple[int, bool, bool, str]]:
        from .http_endpoint import read_probe_file

        states = []
        for index in range(self._supervisor.workers):
            proc = self._supervisor.procs.get(index)
            if proc is None or proc.poll() is not None:
                states.append((index, False, False, "not running"))
                continue
            probes = read_probe_file(probe_path(self._dir, index))
            if probes is None:
                states.append((index, True, False, "starting"))
            else:
                states.append((index, probes.live, probes.ready, probes.reason))
        return states

    @property
    def live(self) -> bool:
        return not self._supervisor.stopping and all(live for _, live, _, _ in self._states())

    @property
    def ready(self) -> bool:
        return not self._supervisor.stopping and all(live and ready for _, live, ready, _ in self._states())

    @property
    def reason(self) -> str:
        if self._supervisor.stopping:
            return "shutting down"
        return (
            "; ".join(f"worker {i}: {reason}" for i, live, ready, reason in self._states() if not (live and ready))
            or "serving"
        )


def probe_path(probe_dir: str, index: int) -> str:
    return os.path.join(probe_dir, f"probes-{index}.json")


class Supervisor:
    """Starts, watches and stops the worker processes (see the module docstring)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.workers = resolve_workers(config)
        self.procs: dict[int, subprocess.Popen] = {}
        self._started: dict[int, float] = {}
        self._stopping = threading.Event()
        self._probe_dir = ""
        self.exit_code = 0

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> int:
        cfg = self.config
        threads = worker_threads(cfg, self.workers)
        with tempfile.TemporaryDirectory(prefix="pathguard-metrics-") as metrics_dir:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before prometheus_client is imported
            # Not service.metrics: the supervisor declares no PathGuard metrics of its own (nor GC counters
            # that would be summed with the workers').
            from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
            from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

            from .http_endpoint import start_http_endpoint

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=metrics_dir)
            registry.register(_WorkerCollector(self))
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            port_holder = _reserve_port(cfg.host, cfg.port)
            port = port_holder.getsockname()[1]
            self._probe_dir = metrics_dir  # the multiprocess collector reads *.db only
            http = start_http_endpoint(cfg.host, cfg.metrics_port, WorkerProbes(self, metrics_dir), registry)
            worker_cfg = replace(cfg, port=port, threads=threads, workers=1)
            log.info(
                "supervisor %d listening on %s:%d (%d workers, %d torch threads each), metrics on :%d/metrics "
                "(probes /healthz, /readyz)",
                os.getpid(),
                cfg.host,
                port,
                self.workers,
                threads,
                http.server_address[1],
            )
            self._install_signals()
            try:
                for index in range(self.workers):
                    self._spawn(index, worker_cfg)
                self._watch(worker_cfg, mark_process_dead)
            finally:
                self._terminate_all()
                http.shutdown()
                http.server_close()
                port_holder.close()
        return self.exit_code

    def _spawn(self, index: int, cfg: ServeConfig) -> None:
        from .http_endpoint import PROBE_FILE_ENV

        probe_file = probe_path(self._probe_dir, index)
        if os.path.exists(probe_file):
            os.remove(probe_file)  # a restarted worker starts not ready
        env = {
            **os.environ,
            _WORKER_ENV: json.dumps({"index": index, "config": asdict(cfg)}),
            _PARENT_ENV: str(os.getpid()),
            PROBE_FILE_ENV: probe_file,
        }
        self.procs[index] = subprocess.Popen([sys.executable, "-m", "service.workers"], env=env)
        self._started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, self.procs[index].pid)

    def _watch(self, cfg: ServeConfig, mark_process_dead) -> None:
        while not self._stopping.is_set():
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                mark_process_dead(proc.pid)
                uptime = time.monotonic() - self._started[index]
                if uptime < MIN_UPTIME_FOR_RESTART:
                    log.error("worker %d (pid %d) exited with %d after %.1f s; stopping", index, proc.pid, code, uptime)
                    del self.procs[index]
                    self.exit_code = 1
                    self._stopping.set()
                    break
                log.error("worker %d (pid %d) exited with %d; restarting it", index, proc.pid, code)
                self._spawn(index, cfg)
            self._stopping.wait(0.5)

    def _install_signals(self) -> None:
        def stop(signum, _frame) -> None:
            log.info("received %s: draining %d workers", signal.Signals(signum).name, len(self.procs))
            self._stopping.set()

        def reload(_signum, _frame) -> None:
            log.info("received SIGHUP: every worker reloads the bundle")
            for proc in self.procs.values():
                proc.send_signal(signal.SIGHUP)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _terminate_all(self) -> None:
        """SIGTERM every worker and wait for their drains (the grace period, plus time to unload)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_period + 30
        for index, proc in self.procs.items():
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop; killing it", index, proc.pid)
                proc.kill()
                code = proc.wait()
            if code != 0:
                log.error("worker %d (pid %d) exited with %d", index, proc.pid, code)
                self.exit_code = 1
        log.info("all workers stopped")


def serve_workers(config: ServeConfig) -> int:
    """Run ``config.workers`` worker processes until SIGTERM/SIGINT; the exit code (0 after a clean drain)."""
    return Supervisor(config).run()


def exit_with_parent(parent: int, poll: float = 0.5) -> None:
    """Make this process get SIGTERM when ``parent`` (its supervisor) dies, however it dies.

    Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` does it at once; a daemon thread that watches ``os.getppid()``
    covers other systems, the race of a parent that died before the prctl, and the prctl failing. SIGTERM
    drains the worker like a normal stop, so calls it already accepted are still answered.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); watching the parent pid", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("prctl unavailable (%s); watching the parent pid", exc)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        log.error("the supervisor (pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the drain had its grace period and more: end for good
        os._exit(1)

    threading.Thread(target=watch, name="pathguard-parent-watch", daemon=True).start()


def _worker_main() -> int:
    spec = json.loads(os.environ.pop(_WORKER_ENV))
    parent = os.environ.pop(_PARENT_ENV, None)
    if parent is not None:
        exit_with_parent(int(parent))
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s [worker {spec['index']}] %(name)s: %(message)s"
    )
    from .server import serve

    return serve(ServeConfig(**spec["config"]), worker=True)


if __name__ == "__main__":
    sys.exit(_worker_main())
