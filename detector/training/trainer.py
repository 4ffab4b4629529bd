"""The training loop: METHOD.md section 2's objective, validation each epoch, a bundle at the end."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..bundle import save_bundle
from ..data import ImageDataset, load_dataset, train_val_split
from ..models import DecoupledNet, PathOutput, create_model
from ..runtime import select_device, set_threads
from . import losses
from .config import TrainConfig
from .metrics import model_metrics

log = logging.getLogger(__name__)


def augment(x: Tensor, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """Random horizontal flips and random translations by up to ``cfg.shift`` pixels, per image."""
    n, c, h, w = x.shape
    if "hflip" in cfg.augment:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    if "shift" in cfg.augment and cfg.shift > 0:
        s = cfg.shift
        padded = F.pad(x, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return x


def objective(model: DecoupledNet, out: PathOutput, y: Tensor, cfg: TrainConfig,
              sparsity_scale: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its terms (as floats, for the log)."""
    ce = F.cross_entropy(out.logits, y)
    terms = {"ce": ce}
    total = ce
    if model.gated:
        soft = out.soft_path
        mi_in = soft if cfg.mi_input == "soft" else out.hard_path
        terms["mi"] = losses.mi_variational_loss(model.path_logits(mi_in), y)
        terms["infomax"] = losses.mean_over_layers([losses.infomax_loss(layer.soft) for layer in out.layers])
        terms["sparsity"] = losses.sparsity_loss(soft)
        terms["align"] = losses.mean_over_layers(
            [losses.align_loss(layer.encoding, layer.soft, cfg.align_distance) for layer in out.layers])
        total = (ce + cfg.w_mi * terms["mi"] + cfg.w_infomax * terms["infomax"]
                 + cfg.w_sparsity * sparsity_scale * terms["sparsity"] + cfg.w_align * terms["align"])
    return total, {k: float(v.detach()) for k, v in terms.items()}


def build_for(cfg: TrainConfig, data: ImageDataset) -> tuple[DecoupledNet, dict]:
    """The model the config asks for, sized and normalised for ``data``; returns (model, arch_args)."""
    x = data.float_images()
    arch_args = {
        "num_classes": len(data.classes), "in_channels": data.shape[0], "input_size": data.shape[1],
        "mean": [round(float(v), 4) for v in x.mean(dim=(0, 2, 3))],
        "std": [round(float(v), 4) for v in x.std(dim=(0, 2, 3))],
    }
    if cfg.head_hidden >= 0:
        arch_args["head_hidden"] = cfg.head_hidden
    return create_model(cfg.arch, gated=cfg.gated, gate=cfg.gate, **arch_args), arch_args


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


# Over 60 lines on purpose: the training loop, read top to bottom as in nanoGPT (setup, epochs, evaluation,
# bundle); the loss terms, schedule and metrics live in their own modules.
def train(cfg: TrainConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train per ``cfg``; write the bundle (with ``train_log.jsonl``) to ``out_dir``; return test metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    threads = set_threads(cfg.threads)
    device = select_device(cfg.device)
    full = load_dataset(cfg.dataset, "train", cfg.data_root)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    tr_idx, va_idx = train_val_split(len(full), cfg.val_size, cfg.seed)
    if cfg.train_subset:
        tr_idx = tr_idx[: cfg.train_subset]
    train_set, val_set = full.subset(tr_idx, ":train"), full.subset(va_idx, ":val")
    model, arch_args = build_for(cfg, train_set)
    model.to(device)
    log.info("training %s (%s) on %d images, %d threads, %s", cfg.arch, "gated" if cfg.gated else "dense",
             len(train_set), threads, device)

    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                              nesterov=True)
    steps_per_epoch = (len(train_set) + cfg.batch_size - 1) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    sched = _scheduler(opt, cfg, total_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    log_path = out_dir / "train_log.jsonl"
    log_path.write_text("")
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        order = torch.randperm(len(train_set), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                   file=sys.stderr, leave=False)
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = augment(train_set.float_images(idx).to(device), cfg, gen)
            y = train_set.labels[idx].to(device)
            warm = cfg.sparsity_warmup * total_steps
            scale = min(1.0, step / warm) if warm > 0 else 1.0
            loss, terms = objective(model, model.forward_path(x), y, cfg, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(ce=f"{terms['ce']:.3f}")
        train_s = time.perf_counter() - t0
        val = model_metrics(model, val_set, device)
        record = {"epoch": epoch, "train_seconds": round(train_s, 1),
                  "train": {k: v / steps_per_epoch for k, v in sums.items()}, "val": val}
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("epoch %d: val acc %.4f density %s flops %.3f (%.0f s)", epoch, val["accuracy"],
                 f"{val.get('gate_density', 1.0):.3f}", val["flops_ratio"], train_s)

    model.eval()
    test_metrics = model_metrics(model, test, device)
    test_metrics["epoch_seconds"] = round(train_s, 1)
    save_bundle(out_dir, model.cpu(), arch=cfg.arch, arch_args=arch_args, classes=train_set.classes,
                train_config=cfg.to_dict(), dataset={"name": cfg.dataset, "fingerprint": full.fingerprint(),
                                                     "train_images": len(train_set), "val_images": len(val_set),
                                                     "split_seed": cfg.seed},
                metrics={"test": test_metrics, "val": val}, command=" ".join(["pathguard", *sys.argv[1:]]))
    return test_metrics
