"""Host set-up and podman builds for ``make image-test`` (deploy/image_test.py runs and checks the result).

Idempotent: Debian's podman, runc and mmdebstrap when missing; ``default_ulimits = []`` in podman's system
containers.conf; a local base image (``mmdebstrap --variant=minbase`` bookworm with python3, imported as
localhost/pathguard-base:bookworm) unless ``PYTHON_IMAGE`` names one. pip's local mirrors and CA bundle from
the host's pip configuration are handed to the build (mirrors over a loopback HTTP server). Build arguments
can be overridden through the environment: PYTHON_IMAGE, TORCH_SPEC, TORCH_PIP_ARGS, EVAL_TORCH_SPEC,
EVAL_TORCH_PIP_ARGS, PIP_ARGS (see the Dockerfile).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = "deploy/docker/Dockerfile"
BASE_IMAGE = "localhost/pathguard-base:bookworm"
TAGS = {"server": "localhost/pathguard:image-test", "eval": "localhost/pathguard-eval:image-test"}
PODMAN = ["podman", "--runtime", "runc"]
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
WORK = Path("/var/tmp/pathguard-image-test")  # build logs, the base image's tarball, the mirror's links


def log(msg: str) -> None:
    print(f"[image-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], *, check: bool = True, timeout: float | None = 600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def podman(*args: str, **kw) -> subprocess.CompletedProcess:
    return run([*PODMAN, *args], **kw)


# ---- 1. host set-up ---------------------------------------------------------------------------------------------


def ensure_tools() -> None:
    missing = [t for t in ("podman", "runc", "mmdebstrap") if shutil.which(t) is None]
    if missing:
        log(f"installing {', '.join(missing)} (apt)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-q"], timeout=900, env=env)
        run(["apt-get", "install", "-y", "-q", *missing], timeout=1800, env=env)


def ensure_containers_conf(path: Path = CONTAINERS_CONF) -> None:
    """``default_ulimits = []`` under ``[containers]``: podman's default nofile ulimit fails on these hosts."""
    text = path.read_text() if path.exists() else ""
    if re.search(r"^\s*default_ulimits\s*=", text, re.M):
        return
    if re.search(r"^\[containers\]", text, re.M):
        text = re.sub(
            r"^\[containers\][^\n]*\n", lambda m: m.group(0) + "default_ulimits = []\n", text, count=1, flags=re.M
        )
    else:
        text += ("\n" if text and not text.endswith("\n") else "") + "[containers]\ndefault_ulimits = []\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    log(f"set default_ulimits = [] in {path}")


def ensure_base_image() -> tuple[str, bool]:
    """PYTHON_IMAGE if given, else the local bookworm image (built once). Returns (image, built now)."""
    if os.environ.get("PYTHON_IMAGE"):
        return os.environ["PYTHON_IMAGE"], False
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE, False
    log(f"building {BASE_IMAGE} with mmdebstrap (minbase bookworm + python3)")
    WORK.mkdir(parents=True, exist_ok=True)
    tar = WORK / "base.tar"
    run(
        [
            "nice",
            "-n",
            "10",
            "mmdebstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(tar),
        ],
        timeout=1800,
    )
    podman("import", str(tar), BASE_IMAGE, timeout=600)
    tar.unlink()
    return BASE_IMAGE, True


def host_pip_config() -> dict[str, list[str]]:
    """find-links, extra-index-url, index-url and cert from the host's pip configuration and environment."""
    out = run([sys.executable, "-m", "pip", "config", "list"], check=False).stdout
    conf: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^[^=]*\.(find-links|extra-index-url|index-url|cert)='(.*)'$", line.strip())
        if m:
            for value in m.group(2).split():
                if value not in conf.setdefault(m.group(1), []):
                    conf[m.group(1)].append(value)
    return conf


class Mirror:
    """Serves the host's local pip mirrors (file:// URLs, folders) to the build over loopback HTTP.

    A fixed port keeps the build arguments, and so podman's layer cache, the same from run to run.
    """

    def __init__(self, port: int = 8711) -> None:
        self.port, self.proc, self.links = port, None, WORK / "mirror"

    def pip_args(self, conf: dict[str, list[str]]) -> tuple[list[str], list[str]]:
        """pip options for the build, and the ``podman build -v`` mounts they need."""
        args: list[str] = []
        mounts: list[str] = []
        for cert in conf.get("cert", [])[:1]:
            if Path(cert).is_file():
                mounts += ["-v", f"{cert}:/run/pathguard-build/ca.crt:ro"]
                args += ["--cert", "/run/pathguard-build/ca.crt"]
        for opt in ("index-url", "extra-index-url", "find-links"):
            for loc in conf.get(opt, []):
                args += [f"--{opt}", self._serve(loc)]
        return args, mounts

    def _serve(self, loc: str) -> str:
        path = loc.removeprefix("file://")
        if not path.startswith("/"):
            return loc  # a remote index: the build reaches it itself (--network host)
        if not Path(path).exists():
            return loc
        link = self.links / path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(path)
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> Mirror:
        if self.links.exists() and any(self.links.iterdir()):
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "http.server",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--directory",
                    str(self.links),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, 10, "the local pip mirror")
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the local pip mirror could not listen on 127.0.0.1:{self.port} "
                    "(in use? set PATHGUARD_MIRROR_PORT)"
                )
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except Exception:
        return False


def torch_build_args(conf: dict[str, list[str]], python_tag: str) -> tuple[dict[str, str], dict[str, str]]:
    """Where each image's torch comes from, and why (the choice is reported).

    Server: a CPU-only torch (no CUDA libraries; the server needs no torchvision): a local ``+cpu`` wheel for
    this Python if pip's find-links has one, else PyTorch's CPU index if reachable, else PyPI's (CUDA) wheel.
    Evaluation: the Makefile's pin (torch + torchvision) from PyTorch's CPU index, else PyPI / the mirror.
    """
    env = os.environ
    pytorch = reachable(PYTORCH_CPU_INDEX + "/torch/")
    args: dict[str, str] = {}
    why: dict[str, str] = {}
    wheels = sorted(
        w
        for d in conf.get("find-links", [])
        if Path(d.removeprefix("file://")).is_dir()
        for w in Path(d.removeprefix("file://")).glob(f"torch-*+cpu-{python_tag}-*.whl")
    )
    if "TORCH_SPEC" in env:
        args["TORCH_SPEC"], why["server"] = env["TORCH_SPEC"], "TORCH_SPEC from the environment"
    elif wheels:
        version = wheels[-1].name.split("-")[1]
        args["TORCH_SPEC"], args["TORCH_PIP_ARGS"] = f"torch=={version}", ""
        why["server"] = f"local CPU wheel {wheels[-1].name} (pip find-links)"
    elif pytorch:
        why["server"] = "PyTorch's CPU index (the Dockerfile's default)"
    else:
        args["TORCH_PIP_ARGS"] = ""
        why["server"] = "PyPI (PyTorch's CPU index unreachable): CUDA wheels, a much larger image"
    if "EVAL_TORCH_SPEC" in env:
        args["EVAL_TORCH_SPEC"] = env["EVAL_TORCH_SPEC"]
    if not pytorch:
        args["EVAL_TORCH_PIP_ARGS"] = ""
    why["eval"] = (
        "PyTorch's CPU index"
        if pytorch
        else "PyPI / local mirror (PyTorch's CPU index unreachable): CUDA build of the Makefile's pin"
    )
    for key in ("TORCH_PIP_ARGS", "EVAL_TORCH_PIP_ARGS"):
        if key in env:
            args[key] = env[key]
    return args, why


# ---- 2. build -----------------------------------------------------------------------------------------------------


def build(target: str, base: str, build_args: dict[str, str], mounts: list[str], tag: str | None = None) -> dict:
    tag = tag or TAGS[target]
    WORK.mkdir(parents=True, exist_ok=True)
    logfile = WORK / f"build-{tag.rsplit(':', 1)[-1]}-{target}.log"
    cmd = [
        "nice",
        "-n",
        "10",
        *PODMAN,
        "build",
        "--network",
        "host",
        *mounts,
        "-f",
        DOCKERFILE,
        "--target",
        target,
        "-t",
        tag,
        "--build-arg",
        f"PYTHON_IMAGE={base}",
    ]
    for key, value in build_args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    log(f"building target {target} -> {tag} (log: {logfile})")
    start = time.monotonic()
    with open(logfile, "w") as f:
        rc = subprocess.run([*cmd, "."], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=3600).returncode
    seconds = time.monotonic() - start
    if rc != 0:
        raise RuntimeError(
            f"build of {target} failed ({rc}); last lines of {logfile}:\n"
            + "".join(logfile.read_text().splitlines(True)[-30:])
        )
    cached = logfile.read_text().count("Using cache")
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    probe = (
        "import importlib.util as u, json, os, sys, torch; print(json.dumps({'python': sys.version.split()[0], "
        "'torch': torch.__version__, 'cuda_build': torch.version.cuda is not None, "
        "'installed': {m: u.find_spec(m) is not None for m in ('torchvision', 'torchattacks', 'matplotlib', "
        "'sklearn', 'grpc')}, 'fashion_mnist': os.path.isdir('/usr/share/datasets/fashion-mnist')}))"
    )
    contents = json.loads(podman("run", "--rm", "--entrypoint", "python", tag, "-c", probe).stdout)
    venv_kb = int(podman("run", "--rm", "--entrypoint", "du", tag, "-sk", "/opt/venv").stdout.split()[0])
    # The largest installed distributions (site-packages folders, MB): where the size goes.
    du = podman(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        tag,
        "-c",
        "du -sk /opt/venv/lib/python3*/site-packages/* | sort -rn | head -12",
    ).stdout
    largest = {
        Path(path).name: round(int(kb) * 1024 / 1e6, 1) for kb, path in (ln.split(None, 1) for ln in du.splitlines())
    }
    log(f"{target}: {size / 1e6:.0f} MB ({seconds:.0f} s, {cached} cached steps)")
    return {
        "tag": tag,
        "target": target,
        "size_bytes": size,
        "size_mb": round(size / 1e6, 1),
        "venv_mb": round(venv_kb * 1024 / 1e6, 1),
        "largest_packages_mb": largest,
        "build_seconds": round(seconds, 1),
        "cached_steps": cached,
        "contents": contents,
        "build_log": str(logfile),
    }


def build_images(targets: list[str], rebuild: bool = True) -> dict:
    """Set the host up and build ``targets``; the report's base_image, torch_source, build_args and images."""
    ensure_tools()
    ensure_containers_conf()
    base, built_base = ensure_base_image()
    out: dict = {
        "base_image": {
            "image": base,
            "built_now": built_base,
            "podman": podman("--version").stdout.strip(),
            "runtime": "runc",
        },
        "images": {},
    }
    conf = host_pip_config()
    python_tag = (
        "cp"
        + podman(
            "run", "--rm", base, "python3", "-c", "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')"
        ).stdout.strip()
    )
    torch_args, out["torch_source"] = torch_build_args(conf, python_tag)
    mirror = Mirror(int(os.environ.get("PATHGUARD_MIRROR_PORT", "8711")))
    pip_args, mounts = mirror.pip_args(conf)
    build_args = {"PIP_ARGS": os.environ.get("PIP_ARGS", " ".join(pip_args)), **torch_args}
    out["build_args"] = build_args
    if not rebuild:
        for target in targets:
            size = int(podman("image", "inspect", "--format", "{{.Size}}", TAGS[target]).stdout.strip())
            out["images"][target] = {"tag": TAGS[target], "size_bytes": size, "size_mb": round(size / 1e6, 1)}
        return out
    with mirror:
        for target in targets:
            out["images"][target] = build(target, base, build_args, mounts)
    return out
