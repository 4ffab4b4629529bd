"""``make image-test``: build PathGuard's container images and check the server image as a user runs it.

Needs root and takes minutes (podman builds), so it is not part of ``make test``. Steps:

1. Host set-up (idempotent; deploy/image_build.py, as step 2): Debian's podman, runc and mmdebstrap;
   ``default_ulimits = []`` in podman's system containers.conf; a local base image (``mmdebstrap
   --variant=minbase`` bookworm with python3, imported as localhost/pathguard-base:bookworm) unless
   ``PYTHON_IMAGE`` names one. pip's local mirrors and CA bundle from the host's pip configuration are handed to
   the build (mirrors over a loopback HTTP server).
2. Build deploy/docker/Dockerfile's ``server`` and ``eval`` targets (``podman --runtime runc build
   --network host``); record build time and image size.
3. Start the server image as a user would deploy it: read-only root filesystem (a tmpfs on /tmp only),
   all capabilities dropped, no privilege escalation, 1 CPU, ports published on loopback.
4. Check it: runs as UID/GID 10001, the root filesystem refuses writes even from root, /tmp is writable,
   ``OMP_WAIT_POLICY=PASSIVE``, gRPC listens on all interfaces, torch threads follow the CPU quota.
5. Screen real Fashion-MNIST test images through it with tritonclient.grpc (KServe v2, deploy/image_client.py
   in a subprocess) and compare with the same bundle run in this process and with the labels.
6. Put it under load (concurrent KServe clients), SIGTERM it, and check it exits 0 having answered every
   call it accepted: client records against the server's own drain log.
7. Write reports/deploy/image-test.json and print a summary; exit 1 if a check failed.

Build arguments can be overridden through the environment: PYTHON_IMAGE, TORCH_SPEC, TORCH_PIP_ARGS,
EVAL_TORCH_SPEC, EVAL_TORCH_PIP_ARGS, PIP_ARGS (see the Dockerfile).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from image_build import ROOT, TAGS, build_images, free_port, log, podman, run, wait_for

CLIENT = ROOT / "deploy" / "image_client.py"
CONTAINER = "pathguard-image-test"
UID = 10001


# ---- 3-6. run and check the server image --------------------------------------------------------------------------


class ServerContainer:
    """The server image started as deployed: read-only root, /tmp tmpfs, no capabilities, 1 CPU."""

    def __init__(self, image: str, cpus: int = 1) -> None:
        self.image, self.cpus = image, cpus
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> ServerContainer:
        podman("rm", "-f", "--ignore", CONTAINER, check=False)
        podman(
            "run",
            "-d",
            "--name",
            CONTAINER,
            "--read-only",
            "--read-only-tmpfs=false",
            "--tmpfs",
            "/tmp:rw,size=64m",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--cpus",
            str(self.cpus),
            "-p",
            f"127.0.0.1:{self.grpc_port}:50051",
            "-p",
            f"127.0.0.1:{self.metrics_port}:8002",
            self.image,
        )
        return self

    def __exit__(self, *exc) -> None:
        podman("rm", "-f", "--ignore", CONTAINER, check=False)

    def exec(self, *cmd: str, user: str | None = None) -> subprocess.CompletedProcess:
        return podman("exec", *(["--user", user] if user else []), CONTAINER, *cmd, check=False)

    def logs(self) -> str:
        proc = podman("logs", CONTAINER, check=False)
        return proc.stdout + proc.stderr

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


def listening_addresses(tcp_tables: str, port: int) -> list[str]:
    """Local addresses of sockets in LISTEN state on ``port`` from /proc/net/tcp and tcp6 text."""
    found = []
    for line in tcp_tables.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 3 and parts[3] == "0A" and ":" in parts[1]:
            addr, p = parts[1].rsplit(":", 1)
            if int(p, 16) == port:
                found.append("0.0.0.0" if set(addr) == {"0"} else addr)
    return found


def check_container(c: ServerContainer) -> dict:
    status = c.exec("cat", "/proc/1/status").stdout
    uid = [int(v) for v in re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()]
    gid = [int(v) for v in re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()]
    root_write = c.exec("sh", "-c", "echo x > /probe", user="0")
    tmp_write = c.exec("sh", "-c", "echo x > /tmp/probe && rm /tmp/probe")
    readonly_flag = podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", CONTAINER).stdout.strip()
    environ = dict(kv.split("=", 1) for kv in c.exec("cat", "/proc/1/environ").stdout.split("\0") if "=" in kv)
    tcp = c.exec("cat", "/proc/net/tcp").stdout + c.exec("sh", "-c", "tail -n +2 /proc/net/tcp6").stdout
    threads = re.search(r"(\d+) torch threads", c.logs())
    return {
        "uid": uid,
        "gid": gid,
        "runs_as_10001": set(uid) == {UID} and set(gid) == {UID},
        "readonly_rootfs_flag": readonly_flag == "true",
        "root_write_refused": root_write.returncode != 0 and "Read-only file system" in root_write.stderr,
        "root_write_error": root_write.stderr.strip(),
        "tmp_writable": tmp_write.returncode == 0,
        "omp_wait_policy": environ.get("OMP_WAIT_POLICY"),
        "grpc_listen_addresses": listening_addresses(tcp, 50051),
        "cpus": c.cpus,
        "torch_threads": int(threads.group(1)) if threads else None,
    }


def client(command: str, target: str, images: Path, *extra: str, timeout: float = 600, popen: bool = False):
    cmd = [sys.executable, str(CLIENT), command, "--target", target, "--images", str(images), *extra]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = run(cmd, timeout=timeout)
    return json.loads(proc.stdout)


def reference(n: int, seed: int, workdir: Path) -> tuple[dict, Path]:
    """n random Fashion-MNIST test images (seeded), their labels, and the default bundle's answers in-process."""
    import numpy as np
    import torch

    from detector.bundle import load_bundle
    from detector.data import load_dataset

    torch.set_num_threads(1)
    test = load_dataset("fashion-mnist", "test")
    idx = torch.from_numpy(np.random.default_rng(seed).choice(len(test), n, replace=False))
    images = test.images[idx]
    path = workdir / "images.npy"
    np.save(path, images.numpy())
    bundle = load_bundle(ROOT / "models" / "default")
    res = bundle.screen(images.float().div(255.0))
    np.save(workdir / "expected.npy", res.predictions)
    return {
        "labels": test.labels[idx].numpy(),
        "predictions": res.predictions,
        "scores": res.scores,
        "indices": idx.numpy(),
        "torch": torch.__version__,
    }, path


def check_screening(c: ServerContainer, images: Path, ref: dict, batch: int) -> dict:
    import numpy as np

    out = client("screen", c.target, images, "--batch", str(batch))
    pred, score = np.asarray(out["predicted_class"]), np.asarray(out["adversarial_score"])
    n = len(ref["labels"])
    metric = re.search(r"^pathguard_images_total (\S+)$", c.metrics(), re.M)
    return {
        "images": n,
        "batch": batch,
        "calls": out["calls"],
        "answered": int(len(pred)),
        "ready_seconds": round(out["ready_seconds"], 2),
        "seconds": round(out["seconds"], 2),
        "images_per_second": round(n / out["seconds"], 1),
        "accuracy": float((pred == ref["labels"]).mean()),
        "accuracy_in_process": float((ref["predictions"] == ref["labels"]).mean()),
        "prediction_agreement_with_in_process": float((pred == ref["predictions"]).mean()),
        "score_max_abs_diff": float(np.abs(score - ref["scores"]).max()),
        "score_agreement_within_1e-3": float((np.abs(score - ref["scores"]) <= 1e-3).mean()),
        "metrics_images_total": float(metric.group(1)) if metric else None,
        "model_platform": out["model_metadata"].get("platform"),
        "client_rpcs": out["calls"],
    }


def drain_under_load(
    c: ServerContainer, images: Path, expected: Path, clients: int, batch: int, load_seconds: float
) -> dict:
    """Concurrent KServe clients; once calls are in flight, SIGTERM; wait for the exit; compare both sides."""
    proc = client(
        "load",
        c.target,
        images,
        "--expect",
        str(expected),
        "--clients",
        str(clients),
        "--batch",
        str(batch),
        "--duration",
        str(load_seconds + 120),
        popen=True,
    )
    try:
        line = proc.stderr.readline()
        if "LOADED" not in line:
            raise RuntimeError(f"load client did not start: {line}{proc.stderr.read()}")

        def inflight() -> float:
            m = re.search(r"^pathguard_inflight_requests (\S+)$", c.metrics(), re.M)
            return float(m.group(1)) if m else 0.0

        wait_for(lambda: inflight() >= max(1, clients // 2), 60, "calls in flight")
        time.sleep(load_seconds)  # steady load first
        inflight_at_signal = inflight()
        t_signal = time.time()
        podman("kill", "--signal", "TERM", CONTAINER)
        exit_code = int(podman("wait", CONTAINER, timeout=120).stdout.strip().splitlines()[-1])
        t_exit = time.time()
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    calls = json.loads(out)["calls"]
    logs = c.logs()
    drain = re.search(
        r"drained in ([\d.]+) s: (\d+) accepted calls finished \((\d+) since start\), (\d+) cut off", logs
    )
    draining = re.search(r"draining: new calls refused, [\d.]+ s grace for (\d+) calls in flight", logs)
    by_status: dict[str, int] = {}
    for r in calls:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    ok = [r for r in calls if r["status"] == "OK"]
    refused = [r for r in calls if r["status"] == "UNAVAILABLE"]
    other = [r for r in calls if r["status"] not in ("OK", "UNAVAILABLE")]
    wrong = [r for r in ok if r["answered"] != r["images"]]
    return {
        "clients": clients,
        "batch": batch,
        "cpus": c.cpus,
        "load_seconds_before_sigterm": load_seconds,
        "inflight_metric_at_sigterm": inflight_at_signal,
        "exit_code": exit_code,
        "seconds_sigterm_to_exit_seen_by_podman": round(t_exit - t_signal, 2),
        "client_calls": len(calls),
        "client_calls_by_status": by_status,
        "client_ok_calls": len(ok),
        "client_ok_calls_ending_after_sigterm": sum(r["end"] > t_signal for r in ok),
        "client_ok_calls_wrong_count": len(wrong),
        "client_mismatched_predictions": sum(r.get("mismatched", 0) for r in ok),
        "client_images_answered": sum(r["answered"] for r in ok),
        "client_refused_messages": sorted({r.get("message", "")[:160] for r in refused}),
        "client_other_errors": [{k: r.get(k) for k in ("status", "message")} for r in other][:10],
        "server_inflight_at_drain": int(draining.group(1)) if draining else None,
        "server_finished_during_drain": int(drain.group(2)) if drain else None,
        "server_finished_since_start": int(drain.group(3)) if drain else None,
        "server_cut_off": int(drain.group(4)) if drain else None,
        "server_drain_seconds": float(drain.group(1)) if drain else None,
        "server_log_tail": logs.splitlines()[-6:],
    }


# ---- 7. report ------------------------------------------------------------------------------------------------------


def verdicts(report: dict) -> dict[str, bool]:
    c, s, d = report["container"], report["screening"], report["drain"]
    answered_everywhere = d["server_finished_since_start"] == s["client_rpcs"] + d["client_ok_calls"]
    return {
        "runs as UID/GID 10001": c["runs_as_10001"],
        "read-only root filesystem (write as root refused)": c["readonly_rootfs_flag"] and c["root_write_refused"],
        "/tmp writable": c["tmp_writable"],
        "OMP_WAIT_POLICY=PASSIVE": c["omp_wait_policy"] == "PASSIVE",
        "gRPC listens on all interfaces": "0.0.0.0" in c["grpc_listen_addresses"],
        "torch threads = CPU quota": c["torch_threads"] == c["cpus"],
        "every image answered": s["answered"] == s["images"],
        "predictions agree with the bundle in-process (>= 99.5%)": s["prediction_agreement_with_in_process"] >= 0.995,
        "SIGTERM under load: exit 0": d["exit_code"] == 0,
        "calls in flight at SIGTERM": (d["server_inflight_at_drain"] or 0) > 0,
        "0 accepted calls lost (none cut off, no error but refusal)": d["server_cut_off"] == 0
        and not d["client_other_errors"]
        and d["client_ok_calls_wrong_count"] == 0,
        "server's count of finished calls = client's answered calls": answered_everywhere,
    }


def summary(report: dict) -> str:
    lines = ["PathGuard image test"]
    for target, b in report["images"].items():
        line = f"  image {target:6s} {b['size_mb']:8.1f} MB"
        if "contents" in b:
            k = b["contents"]
            line += (
                f"  (venv {b['venv_mb']:.0f} MB, torch {k['torch']}, torchvision {k['installed']['torchvision']}, "
                f"torchattacks {k['installed']['torchattacks']}, dataset {k['fashion_mnist']})"
            )
        lines.append(line)
    c, s, d = report.get("container"), report.get("screening"), report.get("drain")
    if c:
        lines.append(
            f"  container: uid {c['uid']} gid {c['gid']}, read-only root: {c['root_write_error'] or '?'}; "
            f"OMP_WAIT_POLICY={c['omp_wait_policy']}; listens on {c['grpc_listen_addresses']}; "
            f"{c['torch_threads']} torch threads on {c['cpus']} CPU"
        )
    if s:
        lines.append(
            f"  screened {s['answered']}/{s['images']} Fashion-MNIST test images over KServe v2 in "
            f"{s['seconds']} s ({s['images_per_second']} img/s): accuracy {s['accuracy']:.4f} "
            f"(in-process {s['accuracy_in_process']:.4f}), "
            f"agreement {s['prediction_agreement_with_in_process']:.4f}, "
            f"max |score diff| {s['score_max_abs_diff']:.2e}"
        )
    if d:
        lines.append(
            f"  SIGTERM under load ({d['clients']} clients x {d['batch']} images): exit {d['exit_code']} "
            f"({d['server_drain_seconds']} s drain); server: {d['server_inflight_at_drain']} in flight, "
            f"{d['server_finished_during_drain']} finished during drain, {d['server_cut_off']} cut off; "
            f"client: {d['client_calls_by_status']}, {d['client_ok_calls_ending_after_sigterm']} answered "
            f"after SIGTERM; server finished {d['server_finished_since_start']} calls in all"
        )
    for name, ok in report.get("checks", {}).items():
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    return "\n".join(lines)


@contextlib.contextmanager
def holding(lock: str | None):
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        log(f"waiting for the lock {lock}")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="server,eval", help="images to build (the checks run on server)")
    p.add_argument("--no-build", action="store_true", help="check the images already built")
    p.add_argument("--images", type=int, default=1000, help="Fashion-MNIST test images to screen")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients during the SIGTERM check")
    p.add_argument("--load-seconds", type=float, default=10.0, help="seconds of load before SIGTERM")
    p.add_argument(
        "--lock",
        help="a file to hold an exclusive flock on while the container runs (its screening "
        "speed and drain under load), so that other heavy jobs on a shared machine do not overlap",
    )
    p.add_argument("--out", default=str(ROOT / "reports" / "deploy" / "image-test.json"))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("make image-test needs root (podman builds and runs containers): run it with sudo", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    targets = [t for t in args.targets.split(",") if t]
    report: dict = {"command": "make image-test", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report.update(build_images(targets, rebuild=not args.no_build))
    with tempfile.TemporaryDirectory(prefix="pathguard-image-") as tmp:
        ref, images = reference(args.images, seed=0, workdir=Path(tmp))
        report["reference"] = {
            "images": args.images,
            "seed": 0,
            "split": "fashion-mnist test",
            "in_process_torch": ref["torch"],
        }
        with holding(args.lock), ServerContainer(TAGS["server"]) as c:
            log(f"started {CONTAINER} from {TAGS['server']} (gRPC {c.target}, metrics :{c.metrics_port})")
            report["screening"] = check_screening(c, images, ref, batch=32)
            report["container"] = check_container(c)
            log(f"screened {args.images} images; SIGTERM under load next")
            report["drain"] = drain_under_load(
                c, images, Path(tmp) / "expected.npy", args.clients, batch=64, load_seconds=args.load_seconds
            )
    report["checks"] = verdicts(report)
    report["passed"] = all(report["checks"].values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summary(report))
    print(f"written {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so that the container and the mirror are cleaned up.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
