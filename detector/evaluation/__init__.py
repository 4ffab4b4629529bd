"""The offline attack-evaluation suite (METHOD.md section 4)."""

from .config import EvalConfig
from .suite import merge, run, run_shard

__all__ = ["EvalConfig", "merge", "run", "run_shard"]
