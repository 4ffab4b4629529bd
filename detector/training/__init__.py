"""Training decoupled networks (METHOD.md section 2)."""

from .config import TrainConfig
from .trainer import train

__all__ = ["TrainConfig", "train"]
