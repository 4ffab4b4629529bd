"""Decoupled CNNs: every gated conv layer carries an architecture controlling module."""

from . import resnet, vgg  # noqa: F401  (registers the variants)
from .base import DecoupledNet
from .gates import GATE_THRESHOLD, ControllingModule, GateConfig, GatedConv, LayerPath, straight_through
from .path import PathOutput
from .registry import create_model, list_models, register_model

__all__ = [
    "GATE_THRESHOLD",
    "ControllingModule",
    "DecoupledNet",
    "GateConfig",
    "GatedConv",
    "LayerPath",
    "PathOutput",
    "create_model",
    "list_models",
    "register_model",
    "straight_through",
]
