"""Wall-clock benchmark of filter skipping: dense twin vs gated-masked vs gated-skipping.

Usage::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m bench.accel_bench --bundle models/default --out accel.json
    # before a trained bundle exists: a random vgg8 with gates set to realistic densities
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m bench.accel_bench --random-arch vgg8 --density 0.3,0.6

What is timed, per image, on real test images of the bundle's dataset (cycled, so gates vary):

``dense``          the dense twin (same architecture, no controlling modules; random weights unless
                   ``--dense-bundle`` gives a trained one: timing does not depend on the values).
``dense_folded``   the dense twin with BatchNorm folded into its convs (the engine on an ungated model):
                   separates what folding gains from what skipping gains.
``masked``         the gated model as trained: every filter computed, off ones multiplied by zero.
``skipping``       :class:`~detector.acceleration.SkippingEngine`, ``batch_mode=auto``; at batch > 1 also
                   ``skipping_union`` and ``skipping_gather``.
``*_path``         ``forward_path`` (logits plus the calculation path) for masked and skipping.
``screening``      the whole screening of a bundle (``Screener.screen`` with the skipping engine: forward
                   pass, path features, prototype distances and the detector), what the service runs.

Every speed-up is against ``dense_folded``, the fair baseline (a dense model deployed for speed has its batch
norm folded too); ``speedup_vs_unfolded`` is kept next to it. A trained dense twin is not needed for timing:
a dense conv costs the same whatever its weights.

Machines here are shared, so absolute times drift while a run lasts. Every repetition runs every variant
once, in a rotated order, and the speed-up of a variant is the median over repetitions of the *paired*
ratio baseline time / variant time from the same repetition; the load average is recorded with the results.
Also reported: the ratio of CPU (process) times, which waiting for a core does not inflate. (A low percentile
of wall times is not: calls shorter than the scheduler's time slice finish uninterrupted more often, which
flatters the faster variant.)
The FLOPs ratio (executed MACs of the gated model relative to the dense twin, controlling modules included)
comes from the same run, over the same images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from detector.acceleration import build_engine, set_gate_densities
from detector.models import DecoupledNet, create_model

from .helpers import REPO

log = logging.getLogger("accel_bench")

BASELINE = "dense_folded"


@dataclass
class BenchConfig:
    """What to benchmark and how long.

    bundle : gated bundle to time (ignored with ``random_arch``).
    dense_bundle : trained dense twin; None builds one with random weights (timing does not care).
    random_arch : time a randomly initialised gated model of this architecture instead of a bundle, with
        gates set by :func:`set_gate_densities` to ``density`` on calibration images.
    density : ``"low,high"`` range of per-layer gate densities for ``random_arch``.
    images : test images cycled through while timing.
    batch_sizes : batch sizes to time.
    threads : torch intra-op thread counts to time (each its own table).
    reps : interleaved repetitions at batch 1, one call per variant each; medians over them are reported.
        Many short samples, rather than a few long ones, let the median skip the ones the scheduler interrupted.
    reps_batched : the same for batches of more than one image.
    seed : for the random models and the image order.
    """

    bundle: str = str(REPO / "models" / "default")
    dense_bundle: str | None = None
    random_arch: str | None = None
    density: str = "0.3,0.6"
    images: int = 256
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: tuple[int, ...] = (1, 2)
    reps: int = 200
    reps_batched: int = 30
    seed: int = 0
    out: str | None = None


def _load_models(cfg: BenchConfig) -> tuple[DecoupledNet, DecoupledNet, Tensor, dict]:
    """(gated model, dense twin, test images (N, C, H, W) in [0, 1], description)."""
    from detector.bundle import load_bundle
    from detector.data import DatasetNotFound, load_dataset

    torch.manual_seed(cfg.seed)
    if cfg.random_arch:
        gated = create_model(cfg.random_arch).eval()
        arch, arch_args = cfg.random_arch, {}
        shape = (gated.in_channels, gated.input_size, gated.input_size)
        try:
            if shape != (1, 28, 28):
                raise DatasetNotFound("only Fashion-MNIST is looked for")
            data = load_dataset("fashion-mnist", "test")
            pool = data.float_images(slice(0, cfg.images + 256))
            source = "fashion-mnist:test"
        except DatasetNotFound:
            pool = torch.rand(cfg.images + 256, *shape, generator=torch.Generator().manual_seed(cfg.seed))
            source = "uniform noise"
        lo, hi = (float(v) for v in cfg.density.split(","))
        # calibrate on images the timing does not use
        targets = set_gate_densities(gated, pool[cfg.images :], (lo, hi), seed=cfg.seed)
        images = pool[: cfg.images]
        desc = {"model": f"random {arch}", "gate_targets": [round(t, 3) for t in targets], "images": source}
    else:
        bundle = load_bundle(cfg.bundle)
        from detector.splits import bundle_splits

        gated, arch, arch_args = bundle.model.eval(), bundle.meta["arch"], bundle.meta["arch_args"]
        test = bundle_splits(bundle.meta).test
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.images]
        images = test.float_images(order)
        desc = {"model": f"bundle {cfg.bundle}", "images": test.name}
        if not gated.gated:
            raise ValueError(f"bundle {cfg.bundle} is a dense model; give a gated bundle")
    if cfg.dense_bundle:
        from detector.bundle import load_bundle

        dense = load_bundle(cfg.dense_bundle).model.eval()
        desc["dense"] = f"bundle {cfg.dense_bundle}"
    else:
        dense = create_model(arch, gated=False, **arch_args).eval()
        desc["dense"] = f"random {arch} (same arch_args)"
    return gated, dense, images, desc


def _flops(gated: DecoupledNet, images: Tensor, batch: int) -> dict:
    with torch.inference_mode():
        outs = [gated.forward_path(images[i : i + 256]) for i in range(0, len(images), 256)]
    macs = torch.cat([o.macs for o in outs])
    dense = outs[0].dense_macs
    density = torch.cat([o.density for o in outs]).mean(0)
    hard = [torch.cat([o.layers[j].hard for o in outs]) for j in range(len(outs[0].layers))]
    distinct, union = [], []
    for h in hard:
        chunks = [h[i : i + batch] for i in range(0, len(h) - batch + 1, batch)] or [h]
        distinct.append(statistics.mean(len(torch.unique(c, dim=0)) for c in chunks))
        union.append(statistics.mean(float(c.amax(0).mean()) for c in chunks))
    ratio = float(macs.mean()) / dense
    return {
        "flops_ratio": ratio,
        "promised_speedup": 1 / ratio,
        "dense_macs": dense,
        "gated_macs_mean": float(macs.mean()),
        "layer_names": [layer.name for layer in outs[0].layers],
        "layer_density": [round(float(d), 4) for d in density],
        f"distinct_patterns_per_batch_of_{batch}": [round(d, 1) for d in distinct],
        f"union_density_batch_of_{batch}": [round(u, 4) for u in union],
    }


def _equivalence(gated: DecoupledNet, engine, images: Tensor) -> dict:
    with torch.inference_mode():
        ref = gated.forward_path(images)
        out = engine.forward_path(images)
        singles = torch.cat([engine(images[i : i + 1]) for i in range(min(32, len(images)))])
    scale = float(ref.logits.abs().max())
    return {
        "batch_rel_err": float((out.logits - ref.logits).abs().max()) / scale,
        "batch1_rel_err": float((singles - ref.logits[: len(singles)]).abs().max()) / scale,
        "hard_path_equal": bool(torch.equal(out.hard_path, ref.hard_path)),
        "macs_equal": bool(torch.allclose(out.macs, ref.macs)),
    }


def _time_variants(
    variants: dict[str, Callable[[Tensor], object]], images: Tensor, batch: int, cfg: BenchConfig
) -> dict[str, dict]:
    reps = cfg.reps if batch == 1 else cfg.reps_batched
    starts = list(range(0, len(images) - batch + 1, batch))
    names = list(variants)
    with torch.inference_mode():
        for fn in variants.values():  # warm-up over every image (oneDNN builds its kernels per shape)
            for s in starts:
                fn(images[s : s + batch])
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(reps):
            x = images[starts[rep % len(starts)] :][:batch]
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                fn = variants[name]
                c0, t0 = time.process_time(), time.perf_counter()
                fn(x)
                wall[name].append((time.perf_counter() - t0) / batch)
                cpu[name].append((time.process_time() - c0) / batch)
    out = {}
    for n in names:
        ratios = [b / v for b, v in zip(wall[BASELINE], wall[n])]
        cpu_ratios = [b / v for b, v in zip(cpu[BASELINE], cpu[n])]
        out[n] = {
            "ms_per_image": 1e3 * statistics.median(wall[n]),
            "speedup_vs_dense": statistics.median(ratios),
            "speedup_iqr": _iqr(ratios),
            "speedup_vs_unfolded": statistics.median([b / v for b, v in zip(wall["dense"], wall[n])]),
            "speedup_of_medians": statistics.median(wall[BASELINE]) / statistics.median(wall[n]),
            "cpu_ms_per_image": 1e3 * statistics.median(cpu[n]),
            "cpu_speedup_vs_dense": statistics.median(cpu_ratios),
            "reps": reps,
        }
    return out


def _iqr(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [round(q[0], 3), round(q[2], 3)]


def run(cfg: BenchConfig) -> dict:
    gated, dense, images, desc = _load_models(cfg)
    engines = {mode: build_engine(gated, batch_mode=mode) for mode in ("auto", "union", "gather")}
    dense_folded = build_engine(dense)
    screener = None
    if not cfg.random_arch:
        from detector.bundle import load_bundle

        screener = load_bundle(cfg.bundle).screener(engine="skipping")
    result = {
        "config": asdict(cfg),
        "setup": {**desc, "baseline": f"{BASELINE} (dense twin, batch norm folded)"},
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_before": list(os.getloadavg()),
    }
    result["flops"] = _flops(gated, images, max(cfg.batch_sizes))
    result["equivalence"] = _equivalence(gated, engines["auto"], images[:64])
    result["runs"] = []
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        for batch in cfg.batch_sizes:
            variants: dict[str, Callable[[Tensor], object]] = {
                "dense": dense,
                "dense_folded": dense_folded,
                "masked": gated,
                "skipping": engines["auto"],
            }
            if batch > 1:
                variants |= {"skipping_union": engines["union"], "skipping_gather": engines["gather"]}
            variants |= {"masked_path": gated.forward_path, "skipping_path": engines["auto"].forward_path}
            if screener is not None:
                variants["screening"] = lambda x: screener.screen(x, validate=False)
            load = os.getloadavg()[0]
            timed = _time_variants(variants, images, batch, cfg)
            result["runs"].append(
                {"threads": threads, "batch": batch, "load_1min": [load, os.getloadavg()[0]], "variants": timed}
            )
            log.info("threads %d batch %d done", threads, batch)
    result["load_after"] = list(os.getloadavg())
    result["targets"] = _targets(result)
    return result


def _targets(result: dict) -> list[dict]:
    promised = result["flops"]["promised_speedup"]
    out = []
    for r in result["runs"]:
        s = r["variants"]["skipping"]["speedup_vs_dense"]
        whole = r["variants"].get("screening", {}).get("speedup_vs_dense")
        out.append(
            {
                "threads": r["threads"],
                "batch": r["batch"],
                "skipping_speedup": round(s, 3),
                "screening_speedup": None if whole is None else round(whole, 3),
                "promised": round(promised, 3),
                "fraction_of_promise": round(s / promised, 3),
                "meets_1.3x": s >= 1.3,
                "within_1.5x_of_promise": s * 1.5 >= promised,
            }
        )
    return out


def format_table(result: dict) -> str:
    f = result["flops"]
    lines = [
        f"setup: {result['setup']}",
        f"FLOPs ratio (gated executed / dense, controlling modules included): {f['flops_ratio']:.3f} "
        f"-> promised speed-up {f['promised_speedup']:.2f}x; layer density {f['layer_density']}",
        f"equivalence: {result['equivalence']}",
        f"load average before {result['load_before'][0]:.1f}, after {result['load_after'][0]:.1f} "
        f"on {result['cpus']} CPUs (shared machine: absolute times drift, paired ratios less)",
        "",
    ]
    for r in result["runs"]:
        load = r["load_1min"]
        lines.append(f"threads {r['threads']}, batch {r['batch']} (load {load[0]:.1f}->{load[1]:.1f})")
        lines.append(
            f"  {'variant':<16} {'wall ms/img':>11} {'speed-up':>9} {'IQR':>15} {'cpu ms/img':>11} {'cpu speed-up':>12}"
        )
        for name, v in r["variants"].items():
            lines.append(
                f"  {name:<16} {v['ms_per_image']:11.3f} {v['speedup_vs_dense']:8.2f}x "
                f"{str(v['speedup_iqr']):>15} {v['cpu_ms_per_image']:11.3f} "
                f"{v['cpu_speedup_vs_dense']:11.2f}x"
            )
    lines.append("")
    for t in result["targets"]:
        lines.append(
            f"threads {t['threads']} batch {t['batch']}: skipping {t['skipping_speedup']:.2f}x vs "
            f"dense folded (whole screening {t['screening_speedup']}x), "
            f"{t['fraction_of_promise']:.2f} of the promised {t['promised']:.2f}x "
            f"(>=1.3x: {t['meets_1.3x']}, within 1.5x of promise: {t['within_1.5x_of_promise']})"
        )
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=BenchConfig.bundle, help="gated bundle (default: models/default)")
    p.add_argument("--dense-bundle", help="trained dense twin (default: random weights, same architecture)")
    p.add_argument("--random-arch", help="time a random gated model of this architecture instead of a bundle")
    p.add_argument("--density", default=BenchConfig.density, help="per-layer gate density range for --random-arch")
    p.add_argument("--images", type=int, default=BenchConfig.images)
    p.add_argument("--batch-sizes", type=_ints, default=BenchConfig.batch_sizes)
    p.add_argument("--threads", type=_ints, default=BenchConfig.threads)
    p.add_argument("--reps", type=int, default=BenchConfig.reps)
    p.add_argument("--reps-batched", type=int, default=BenchConfig.reps_batched)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if "OMP_WAIT_POLICY" not in os.environ:
        log.warning("OMP_WAIT_POLICY is unset; on a shared machine set OMP_WAIT_POLICY=PASSIVE")
    cfg = BenchConfig(**{k: v for k, v in vars(args).items()})
    result = run(cfg)
    print(format_table(result))
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
