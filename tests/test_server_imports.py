"""The server image (deploy/docker, target ``server``) leaves out torchattacks, torchvision and matplotlib:
``pathguard serve`` and everything its command line parses must import without them."""

import subprocess
import sys
from pathlib import Path

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "default"

# A meta-path finder that refuses the offline-only packages, as if they were not installed.
BLOCK = """
import sys
OFFLINE_ONLY = {"torchattacks", "torchvision", "matplotlib"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OFFLINE_ONLY:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
"""


def run_without_offline_packages(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_serve_command_line_and_server_import_without_offline_packages():
    proc = run_without_offline_packages(
        "from pathguard.main import build_parser, main\n"
        "args = build_parser().parse_args(['serve', '--port', '0'])\n"
        "assert args.command == 'serve'\n"
        f"assert main(['info', {str(DEFAULT_BUNDLE)!r}]) == 0\n"
        "import service.server, service.screening\n"
        "from detector.bundle import load_bundle\n"
        f"load_bundle({str(DEFAULT_BUNDLE)!r})\n"
        "print('ok', sorted(m for m in sys.modules if m.split('.')[0] in OFFLINE_ONLY))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["ok", "[]"]


def test_blocker_really_blocks():
    proc = run_without_offline_packages(
        "from detector.attacks import parse_attack\nimport torch\nparse_attack('fgsm').build(torch.nn.Flatten())\n"
    )
    assert proc.returncode != 0
    assert "ModuleNotFoundError: No module named 'torchattacks' (blocked)" in proc.stderr


def test_every_registered_attack_names_a_class_that_exists():
    import importlib

    from detector.attacks.registry import ATTACKS

    for name, info in ATTACKS.items():
        module, _, cls = info.cls.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), cls), type), name
