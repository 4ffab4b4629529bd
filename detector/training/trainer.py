"""The training loop: METHOD.md section 2's objective, validation each epoch, a bundle at the end."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..bundle import read_meta, save_bundle
from ..data import ImageDataset, load_dataset, train_val_split
from ..models import ControllingModule, DecoupledNet, PathOutput, create_model
from ..runtime import select_device, set_threads, use_deterministic_kernels
from . import checkpoint, losses
from .adversarial import mix_adversarial, robust_test_metrics
from .config import TrainConfig
from .decouple import continue_dense, decouple_from
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
        x = padded[
            torch.arange(n, device=x.device)[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            rows,
            cols,
        ]
    return x


def aux_scale(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """r(t): every auxiliary term's weight ramps linearly from 0 to 1 over ``aux_warmup`` of training."""
    warm = cfg.aux_warmup * total_steps
    return min(1.0, step / warm) if warm > 0 else 1.0


def _align_term(out: PathOutput, cfg: TrainConfig) -> Tensor:
    if cfg.align_mode == "onesided":
        return losses.mean_over_layers([losses.onesided_align_loss(layer.encoding, layer.soft) for layer in out.layers])
    terms = []
    for layer in out.layers:
        e = layer.encoding
        if cfg.align_mode == "rescaled":
            # the density a uniform per-layer density d implies for a FLOPs target t: d * d ~ t (conv on
            # active input x active output channels); without a target e keeps the max-normalised mean
            e = losses.rescale_encoding(e, cfg.target_flops**0.5) if cfg.target_flops > 0 else e
        terms.append(losses.align_loss(e, layer.soft, cfg.align_distance))
    return losses.mean_over_layers(terms)


def objective(
    model: DecoupledNet,
    out: PathOutput,
    y: Tensor,
    cfg: TrainConfig,
    sparsity_scale: float = 1.0,
    aux: float = 1.0,
    teacher: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its terms (as floats, for the log). ``aux`` scales every auxiliary term (the ramp).

    ``teacher`` is the init_from model's ``(logits, penultimate)`` on the batch, for the distillation terms.
    """
    ce = F.cross_entropy(out.logits, y)
    terms = {"ce": ce}
    total = ce
    if teacher is not None and cfg.distill > 0:
        terms["distill"] = losses.distill_loss(out.logits, teacher[0], cfg.distill_temperature)
        total = (1 - cfg.distill) * ce + cfg.distill * terms["distill"]
    if teacher is not None and cfg.distill_features > 0:
        terms["hint"] = losses.feature_hint_loss(out.penultimate, teacher[1])
        total = total + cfg.distill_features * terms["hint"]
    if model.gated:
        soft = out.soft_path
        mi_in = soft if cfg.mi_input == "soft" else out.hard_path
        terms["mi"] = losses.mi_variational_loss(model.path_logits(mi_in), y)
        terms["infomax"] = losses.mean_over_layers([losses.infomax_loss(layer.soft) for layer in out.layers])
        terms["sparsity"] = losses.sparsity_loss(soft)
        terms["align"] = _align_term(out, cfg)
        side = (
            cfg.w_mi * terms["mi"]
            + cfg.w_infomax * terms["infomax"]
            + cfg.w_sparsity * sparsity_scale * terms["sparsity"]
            + cfg.w_align * terms["align"]
        )
        terms["flops"] = out.flops_ratio.mean()
        if cfg.target_flops > 0:
            terms["flops_target"] = losses.flops_target_loss(out.flops_ratio, cfg.target_flops)
            side = side + cfg.w_flops * terms["flops_target"]
        total = total + aux * side
    return total, {k: float(v.detach()) for k, v in terms.items()}


def build_for(cfg: TrainConfig, data: ImageDataset) -> tuple[DecoupledNet, dict]:
    """The model the config asks for, sized and normalised for ``data``; returns (model, arch_args)."""
    x = data.float_images()
    arch_args = {
        "num_classes": len(data.classes),
        "in_channels": data.shape[0],
        "input_size": data.shape[1],
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


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)


def freeze_gates(model: nn.Module, frozen: bool) -> None:
    """Stop (or restart) training every controlling module; the rest of the network keeps learning."""
    for m in model.modules():
        if isinstance(m, ControllingModule):
            m.requires_grad_(not frozen)


def train_epoch(
    model: DecoupledNet,
    train_set: ImageDataset,
    cfg: TrainConfig,
    *,
    opt: torch.optim.Optimizer,
    sched,
    gen: torch.Generator,
    step: int,
    total_steps: int,
    device: torch.device,
    teacher: nn.Module | None = None,
    desc: str = "",
    progress: bool = False,
) -> tuple[int, dict]:
    """One pass over ``train_set`` in the order ``gen`` draws; returns (step after it, mean loss terms)."""
    model.train()
    steps = (len(train_set) + cfg.batch_size - 1) // cfg.batch_size
    sums: dict[str, float] = {}
    order = torch.randperm(len(train_set), generator=gen)
    bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr, leave=False)
    for b in bar:
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        x = augment(train_set.float_images(idx).to(device), cfg, gen)
        y = train_set.labels[idx].to(device)
        warm = cfg.sparsity_warmup * total_steps
        scale = min(1.0, step / warm) if warm > 0 else 1.0
        taught = None
        if teacher is not None:
            with torch.no_grad():
                taught = teacher.forward_features(x)  # on the clean images, also for the rows attacked next
        x = mix_adversarial(model, x, y, cfg, gen)
        loss, terms = objective(model, model.forward_path(x), y, cfg, scale, aux_scale(cfg, step, total_steps), taught)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(ce=f"{terms['ce']:.3f}")
    return step, {k: v / steps for k, v in sums.items()}


def split_seed(cfg: TrainConfig) -> int:
    """Seed of the train / validation split: the run's own, or, for a run that continues a bundle
    (``init_from``), that bundle's, whatever ``cfg.seed`` is. On another split a continued model would be
    validated on images its start was trained on (its validation accuracy inflated, a point and more for
    ``decouple --seed 1`` from a seed-0 dense model), and its detector fitted on them."""
    if not cfg.init_from:
        return cfg.seed
    where = f"init_from={cfg.init_from!r}"
    dataset = read_meta(cfg.init_from).get("dataset") or {}
    if "split_seed" not in dataset:
        raise ValueError(f"{where} does not record its train/validation split (dataset.split_seed)")
    if int(dataset.get("val_images", cfg.val_size)) != cfg.val_size:
        raise ValueError(
            f"{where} held out {dataset['val_images']} validation images, this run val_size={cfg.val_size}: a "
            f"continued model keeps its start's split (set val_size to {dataset['val_images']})"
        )
    return int(dataset["split_seed"])


Data = tuple[ImageDataset, ImageDataset, ImageDataset, ImageDataset, int]


def _datasets(cfg: TrainConfig) -> Data:
    """(full training set, test set, training split, validation split, split seed) per ``cfg``; the seed is read
    once (:func:`split_seed`) so that the bundle records the split the run was trained on."""
    split = split_seed(cfg)
    full = load_dataset(cfg.dataset, "train", cfg.data_root)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    tr_idx, va_idx = train_val_split(len(full), cfg.val_size, split)
    if cfg.train_subset:
        tr_idx = tr_idx[: cfg.train_subset]
    return full, test, full.subset(tr_idx, ":train"), full.subset(va_idx, ":val"), split


def _start_model(
    cfg: TrainConfig, full: ImageDataset, train_set: ImageDataset, device: torch.device, threads: int
) -> tuple[DecoupledNet, dict, nn.Module | None, dict]:
    """(model, arch_args, teacher or None, the bundle's extra record): new, or continued from ``init_from``."""
    teacher, extra = None, {"command": " ".join(["pathguard", *sys.argv[1:]])}
    if cfg.init_from:
        start = decouple_from if cfg.gated else continue_dense
        model, arch_args, teacher, digest = start(cfg, full.fingerprint())
        if teacher is not None:
            teacher.to(device)
        extra["teacher_sha256"] = digest
    else:
        model, arch_args = build_for(cfg, train_set)
    model.to(device)
    log.info(
        "training %s (%s%s) on %d images, %d threads, %s",
        cfg.arch,
        "gated" if cfg.gated else "dense",
        f", from {cfg.init_from}" if cfg.init_from else "",
        len(train_set),
        threads,
        device,
    )
    return model, arch_args, teacher, extra


def _resume_or_start(
    out_dir: Path, cfg: TrainConfig, resume: bool, extra: dict, log_path: Path, **state
) -> tuple[int, int]:
    """(first epoch, step): loaded from the checkpoint into ``state`` (model, opt, sched, gen) on ``resume``,
    else (1, 0) after checking no unfinished run is there. Truncates ``log_path`` to the epochs kept."""
    if not resume:
        if checkpoint.has_checkpoint(out_dir):
            raise checkpoint.CheckpointError(
                f"{out_dir} holds the checkpoint of an unfinished run ({checkpoint.checkpoint_dir(out_dir)}): "
                "resume it (--resume), or delete that folder to start over"
            )
        log_path.write_text("")
        return 1, 0
    meta = checkpoint.load_checkpoint(out_dir, cfg=cfg, **state)
    if meta["extra"].get("teacher_sha256") != extra.get("teacher_sha256"):
        raise checkpoint.CheckpointError(
            f"checkpoint in {out_dir} was distilled from another teacher than {cfg.init_from} (its weights changed)"
        )
    # the bundle names the command that started the run, and each that continued it
    started = meta["extra"].get("command", "?")
    extra["command"] = f"{started}; resumed after epoch {meta['epoch']}: {extra['command']}"
    kept = (
        [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["epoch"] <= meta["epoch"]]
        if log_path.is_file()
        else []
    )
    log_path.write_text("".join(ln + "\n" for ln in kept))
    log.info("resuming %s after epoch %d (step %d)", out_dir, meta["epoch"], meta["step"])
    return meta["epoch"] + 1, meta["step"]


def _end_epoch(
    out_dir: Path, log_path: Path, record: dict, *, cfg: TrainConfig, step: int, seconds: float, extra: dict, **state
) -> None:
    """Append the epoch's ``record`` to the log, checkpoint ``state`` (model, opt, sched, gen), say so."""
    with log_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    checkpoint.save_checkpoint(out_dir, epoch=record["epoch"], step=step, cfg=cfg, extra=extra, **state)
    val = record["val"]
    log.info(
        "epoch %d: val acc %.4f density %s flops %.3f (%.0f s)",
        record["epoch"],
        val["accuracy"],
        f"{val.get('gate_density', 1.0):.3f}",
        val["flops_ratio"],
        seconds,
    )


def _finish(
    out_dir: Path,
    cfg: TrainConfig,
    model: DecoupledNet,
    *,
    data: Data,
    val: dict,
    train_s: float,
    arch_args: dict,
    extra: dict,
    device: torch.device,
) -> dict:
    """Test the trained model, write the bundle, drop the checkpoint; returns the test metrics."""
    full, test, train_set, val_set, split = data
    model.eval()
    if not val:
        val = model_metrics(model, val_set, device)
    test_metrics = model_metrics(model, test, device)
    test_metrics["epoch_seconds"] = round(train_s, 1)
    if cfg.adversarial_eps > 0:
        test_metrics["robust"] = robust_test_metrics(model, test, cfg)
    dataset = {
        "name": cfg.dataset,
        "fingerprint": full.fingerprint(),
        "train_images": len(train_set),
        "val_images": len(val_set),
        "split_seed": split,
    }
    save_bundle(
        out_dir,
        model.cpu(),
        arch=cfg.arch,
        arch_args=arch_args,
        classes=train_set.classes,
        train_config=cfg.to_dict(),
        dataset=dataset,
        metrics={"test": test_metrics, "val": val},
        command=extra["command"],
    )
    checkpoint.remove_checkpoint(out_dir)
    return test_metrics


def train(
    cfg: TrainConfig, out_dir: str | Path, *, progress: bool = True, resume: bool = False, stop_after: int | None = None
) -> dict:
    """Train per ``cfg``; write the bundle (with ``train_log.jsonl``) to ``out_dir``; return test metrics.

    A checkpoint is written to ``out_dir/checkpoint/`` after every epoch and removed once the bundle is
    written. ``resume=True`` continues from it (the config must be the one it was written with) and ends
    with the weights an uninterrupted run would have. ``stop_after=N`` stops once epoch N is checkpointed
    (a run split over several sessions) and returns ``{"stopped_after_epoch": N}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    threads = set_threads(cfg.threads)
    device = select_device(cfg.device)
    use_deterministic_kernels(device)
    data = _datasets(cfg)
    full, _, train_set, val_set, _ = data
    model, arch_args, teacher, extra = _start_model(cfg, full, train_set, device, threads)
    opt = _optimizer(model, cfg)
    steps_per_epoch = (len(train_set) + cfg.batch_size - 1) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    sched = _scheduler(opt, cfg, total_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = {"model": model, "opt": opt, "sched": sched, "gen": gen}
    log_path = out_dir / "train_log.jsonl"
    first, step = _resume_or_start(out_dir, cfg, resume, extra, log_path, **state)
    train_s, val = 0.0, {}
    for epoch in range(first, cfg.epochs + 1):
        freeze_gates(model, epoch > cfg.epochs - cfg.freeze_gates_epochs)
        t0 = time.perf_counter()
        step, means = train_epoch(
            model,
            train_set,
            cfg,
            opt=opt,
            sched=sched,
            gen=gen,
            step=step,
            total_steps=total_steps,
            device=device,
            teacher=teacher,
            desc=f"epoch {epoch}/{cfg.epochs}",
            progress=progress,
        )
        train_s = time.perf_counter() - t0
        val = model_metrics(model, val_set, device)
        record = {"epoch": epoch, "train_seconds": round(train_s, 1), "train": means, "val": val}
        _end_epoch(out_dir, log_path, record, cfg=cfg, step=step, seconds=train_s, extra=extra, **state)
        if stop_after is not None and epoch >= stop_after and epoch < cfg.epochs:
            log.info("stopping after epoch %d; continue with --resume", epoch)
            return {"stopped_after_epoch": epoch}
    return _finish(
        out_dir, cfg, model, data=data, val=val, train_s=train_s, arch_args=arch_args, extra=extra, device=device
    )
