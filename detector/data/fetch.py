"""``pathguard data fetch``: make Fashion-MNIST available, from Debian's package or its upstream."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from .sources import DEBIAN_FASHION_MNIST, DatasetNotFound, load_fashion_mnist

log = logging.getLogger(__name__)

UPSTREAM = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def fetch_fashion_mnist(root: Path | None = None) -> str:
    """Return where Fashion-MNIST is, installing or downloading it first if needed.

    Order: already present (``root`` or Debian's path) -> ``apt-get install dataset-fashion-mnist``
    (when running as root with apt) -> download from upstream into ``root`` through torchvision.
    Raises :class:`DatasetNotFound` with what to do when all fail.
    """
    try:
        load_fashion_mnist("test", root)
        return f"Fashion-MNIST found ({_where(root)})"
    except DatasetNotFound:
        pass
    tried = []
    if shutil.which("apt-get") and os.geteuid() == 0:
        log.info("installing Debian package dataset-fashion-mnist")
        r = subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], capture_output=True, text=True)
        if r.returncode == 0 and (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
            return f"installed Debian package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})"
        tried.append(f"apt-get install dataset-fashion-mnist failed: {r.stderr.strip()[-200:]}")
    else:
        tried.append("apt-get not usable (needs root and apt)")
    target = root or Path.home() / ".cache" / "pathguard" / "data"
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(target), train=False, download=True)
        FashionMNIST(str(target), train=True, download=True)
        load_fashion_mnist("test", target)
        return f"downloaded Fashion-MNIST to {target}; pass --data-root {target}"
    except Exception as exc:  # network errors come in many types
        tried.append(f"download from {UPSTREAM} failed: {exc}")
    raise DatasetNotFound(
        "Fashion-MNIST is not available. Tried: " + "; ".join(tried) + ". Either run "
        "`sudo apt-get install dataset-fashion-mnist`, or download the four *-ubyte.gz files from "
        f"{UPSTREAM} into a folder and pass --data-root FOLDER."
    )


def _where(root: Path | None) -> str:
    for d in ([root] if root else []) + [DEBIAN_FASHION_MNIST]:
        if d and d.exists():
            return str(d)
    return "?"
