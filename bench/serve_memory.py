"""Where a server's resident memory goes: the stages a ``pathguard serve`` process passes before its first answer.

Usage::

    .venv/bin/python -m bench.serve_memory --bundles models/default models/robust --json reports/service/memory.json

For each bundle a fresh Python process reads its own resident set size (``/proc/self/statm``) after each stage:
the bare interpreter, ``import torch``, loading the bundle (model, prototypes, detector), screening a first batch
of 32 images (allocator pools, oneDNN kernels), and importing the service (grpc, the generated protos, Prometheus).
What a Kubernetes memory limit has to cover is the last figure plus the requests in flight (deploy/README.md).
Comparing bundles in one run separates what a bundle adds from what the environment (torch's build) costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from .helpers import REPO, emit_json

_STAGES = r"""
import json, sys
def mb():
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * 4096 / 2**20, 1)
out = {"interpreter": mb()}
import torch
torch.set_num_threads(1)
out["import_torch"] = mb()
from detector.bundle import load_bundle
bundle = load_bundle(sys.argv[1])
out["load_bundle"] = mb()
bundle.screen(torch.rand(32, *bundle.input_shape, generator=torch.Generator().manual_seed(0)))
out["first_screen_32"] = mb()
import service.server  # noqa: F401
out["import_service"] = mb()
out["torch"] = torch.__version__
print(json.dumps(out))
"""


def measure(bundle: str) -> dict:
    """The resident-memory stages (MB) of one fresh process serving ``bundle``."""
    proc = subprocess.run(
        [sys.executable, "-c", _STAGES, bundle], cwd=REPO, capture_output=True, text=True, check=True, timeout=600
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", nargs="+", default=["models/default"])
    ap.add_argument("--json", help="file to write (printed either way)")
    args = ap.parse_args(argv)
    emit_json({"unit": "MB resident (RSS)", "bundles": {b: measure(b) for b in args.bundles}}, args.json)


if __name__ == "__main__":
    main()
