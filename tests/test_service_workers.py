"""`pathguard serve --workers 2`: both processes answer, metrics add up across them, SIGHUP reloads every
worker, SIGTERM drains both and the supervisor exits 0; the supervisor answers /healthz and /readyz, and
its workers end when it is killed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service_helpers import sample, scrape, wait_until
from synthetic import make_images

from bench.helpers import ServerProcess, loopback_serve_args
from service.client import PathGuardClient

METHOD = "pathguard.v1.PathGuard/ScreenImages"
# grpc shares one connection between channels to the same target unless each has its own subchannel pool;
# SO_REUSEPORT spreads connections, not calls, over the workers.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def _workers(bundle, workers: int, *args: str) -> ServerProcess:
    """``pathguard serve --workers N`` (its supervisor logs the shared port and /metrics), every worker ready."""
    server = ServerProcess(bundle, 1, ["--workers", str(workers), *args])
    wait_until(lambda: _count(server, "ready:") == workers or server.proc.poll() is not None, 120)
    assert server.proc.poll() is None, server.log
    return server


def _count(server: ServerProcess, text: str) -> int:
    return server.log.count(text)


def _one_call_per_connection(target: str, images, n: int) -> list[int]:
    """n calls, each on a channel (connection) of its own, so SO_REUSEPORT spreads them over the workers."""

    def call(i: int) -> int:
        with PathGuardClient(target, timeout=60, options=OWN_CONNECTION) as client:
            return client.screen(images[i % len(images)][None])[0].class_index

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(call, range(n)))


def test_two_workers_answer_add_up_reload_and_drain_on_sigterm(tiny_bundle):
    server = _workers(tiny_bundle, 2, "--max-batch-size", "1", "--grace-period", "60")
    try:
        x, _ = make_images(64, seed=51)
        before = scrape(server.metrics_url)
        assert sample(before, "pathguard_workers") == 2
        for _ in range(8):  # health answers SERVING on whichever worker a connection reaches
            with PathGuardClient(server.target, timeout=30, options=OWN_CONNECTION) as client:
                assert client.health() == "SERVING"
        answers = _one_call_per_connection(server.target, x, 32)
        after = scrape(server.metrics_url)
        assert len(answers) == 32
        # the supervisor's /metrics is the sum over both workers
        assert sample(after, "pathguard_requests_total", method=METHOD, code="OK") == 32
        assert sample(after, "pathguard_images_total") == 32
        per_class = [v for k, v in after.items() if k.startswith("pathguard_predictions_total{")]
        assert sum(per_class) == 32
        assert sample(after, "pathguard_request_duration_seconds_count", method=METHOD, code="OK") == 32
        assert all(sample(after, "pathguard_worker_cpu_seconds_total", worker=str(i)) > 0 for i in range(2))

        server.proc.send_signal(signal.SIGHUP)  # every worker reloads
        wait_until(lambda: _count(server, "reloaded: now serving") == 2, 60)
        assert sample(scrape(server.metrics_url), "pathguard_reloads_total", result="success") == 2

        # SIGTERM while accepted calls are in flight (64 images each, batches of one)
        with ThreadPoolExecutor(12) as pool:

            def big_call(_: int) -> int:
                with PathGuardClient(server.target, timeout=120, options=OWN_CONNECTION) as client:
                    return len(client.screen(x))

            calls = [pool.submit(big_call, i) for i in range(12)]

            def all_accepted_some_pending() -> bool:  # every call in flight or answered, some still in flight
                inflight = sample(scrape(server.metrics_url), "pathguard_inflight_requests")
                return inflight > 0 and inflight + sum(call.done() for call in calls) >= len(calls)

            wait_until(all_accepted_some_pending, 60)
            server.proc.send_signal(signal.SIGTERM)
            results = [call.result(120) for call in calls]
        assert results == [len(x)] * 12
        assert server.proc.wait(90) == 0, server.log
        log = server.log
        drained = {
            int(w): (int(f), int(total), int(cut))
            for w, f, total, cut in re.findall(
                r"\[worker (\d)\] service.server: drained in [\d.]+ s: (\d+) accepted calls finished \((\d+) since "
                r"start\), (\d+) cut off",
                log,
            )
        }
        assert set(drained) == {0, 1}, log
        assert all(total > 0 for _, total, _ in drained.values()), f"a worker answered nothing: {drained}"
        assert sum(total for _, total, _ in drained.values()) == 32 + 12
        assert all(cut == 0 for _, _, cut in drained.values())
        assert "all workers stopped" in log
    finally:
        server.kill()


def test_a_worker_that_cannot_start_stops_the_supervisor_with_exit_1(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pathguard", *loopback_serve_args(tmp_path / "missing", 1), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stopping" in proc.stdout + proc.stderr


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: it holds no port and runs no code)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_probes_follow_the_workers_and_workers_die_with_a_killed_supervisor(tiny_bundle):
    server = _workers(tiny_bundle, 2)
    try:
        base = server.metrics_url.rsplit("/", 1)[0]
        for path in ("/healthz", "/readyz"):  # the supervisor answers the probes for its workers
            with urllib.request.urlopen(base + path, timeout=10) as response:
                assert response.status == 200 and response.read() == b"ok\n"
        pids = [int(pid) for pid in re.findall(r"worker \d started \(pid (\d+)\)", server.log)]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids), server.log
        server.proc.kill()  # SIGKILL: the supervisor can forward nothing
        server.proc.wait(10)
        wait_until(lambda: not any(_alive(pid) for pid in pids), 10)
        with socket.socket() as s:  # the port is free again: no orphan holds it
            s.bind(("127.0.0.1", server.port))
    finally:
        for pid in re.findall(r"worker \d started \(pid (\d+)\)", server.log):
            if _alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)
        server.kill()


def test_exit_with_parent_stops_a_process_whose_parent_is_killed(tmp_path):
    """The fallback without prctl: the parent-pid watcher alone ends the child when its parent dies."""
    child_code = (
        "import os, signal, sys, time; from service import workers; "
        "workers.sys = type('S', (), {'platform': 'other'}); "  # skip prctl: the watcher alone
        "workers.exit_with_parent(os.getppid(), poll=0.1); "
        "print(os.getpid(), flush=True); time.sleep(60)"
    )
    parent_code = (
        f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child_code!r}], "
        "stdout=subprocess.PIPE, text=True); print(p.stdout.readline().strip(), flush=True); "
        "time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait(10)
        wait_until(lambda: not _alive(child), 10)
    finally:
        parent.kill()
