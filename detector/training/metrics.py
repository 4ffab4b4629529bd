"""What a trained model is reported with (METHOD.md section 2, 'Report, per run')."""

from __future__ import annotations

import torch
from torch import Tensor

from ..data import ImageDataset
from ..models import DecoupledNet


@torch.no_grad()
def collect_paths(
    model: DecoupledNet, data: ImageDataset, batch_size: int = 500, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Run ``data`` through ``model`` in eval mode; return logits, hard path, density, flops ratio."""
    model.eval()
    keys = ("logits", "hard", "density", "flops_ratio", "path_logits")
    out: dict[str, list[Tensor]] = {k: [] for k in keys}
    for start in range(0, len(data), batch_size):
        x = data.float_images(slice(start, start + batch_size)).to(device)
        rec = model.forward_path(x)
        out["logits"].append(rec.logits.cpu())
        out["hard"].append(rec.hard_path.cpu())
        out["density"].append(rec.density.cpu())
        out["flops_ratio"].append(rec.flops_ratio.cpu())
        if model.path_head is not None:
            out["path_logits"].append(model.path_logits(rec.hard_path).cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


def mean_hamming(paths: Tensor, labels: Tensor, max_items: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Mean normalised Hamming distance between paths of the same class and of different classes."""
    if len(paths) > max_items:
        idx = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:max_items]
        paths, labels = paths[idx], labels[idx]
    p = paths.float()
    dist = torch.cdist(p, p, p=1) / p.shape[1]
    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(len(p), dtype=torch.bool)
    return float(dist[same & off_diag].mean()), float(dist[~same].mean())


def model_metrics(model: DecoupledNet, data: ImageDataset, device: torch.device | str = "cpu") -> dict:
    """Accuracy, gate densities, executed-FLOPs ratio and how much the paths say about the class."""
    r = collect_paths(model, data, device=device)
    labels = data.labels
    m = {"accuracy": float((r["logits"].argmax(1) == labels).float().mean()), "n": len(data)}
    m["flops_ratio"] = float(r["flops_ratio"].mean())
    if model.gated:
        m["gate_density"] = float(r["hard"].float().mean())
        m["layer_density"] = {n: float(d) for n, d in zip(model.layer_names, r["density"].mean(0))}
        m["path_head_accuracy"] = float((r["path_logits"].argmax(1) == labels).float().mean())
        same, diff = mean_hamming(r["hard"], labels)
        m["hamming_same_class"], m["hamming_other_class"] = same, diff
        m["distinct_paths"] = int(torch.unique(r["hard"], dim=0).shape[0])
    return m
