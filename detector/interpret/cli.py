"""``pathguard explain``: registered by :func:`detector.commands.register`."""

from __future__ import annotations

import argparse
import json


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--indices {text!r} must be comma-separated integers, e.g. 3,17,42") from None


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explainer import ExplainConfig, explain

    cfg = ExplainConfig(bundle=args.bundle, out=args.out, images=args.images, indices=args.indices or (),
                        image_files=tuple(args.image_files or ()), attack_file=args.attack_file, split=args.split,
                        threshold=args.threshold, prototype_images=args.prototype_images, seed=args.seed,
                        data_root=args.data_root)
    index = explain(cfg)
    print(json.dumps({"out": args.out, "report": f"{args.out}/report.md", "layers": len(index["layers"]),
                      "inputs": len(index["inputs"]), "similarity": index["similarity_summary"]["most_similar"][:3],
                      "specificity": {k: v for k, v in index["specificity_summary"].items()
                                      if k != "specific_per_class"}}, indent=2))
    return 0


def register(sub: argparse._SubParsersAction, default_bundle: str) -> None:
    p = sub.add_parser("explain", help="path-level pictures: per-class filter usage, class similarity, "
                       "class-specific filters, single inputs against their prototype",
                       description="Write per-class filter-usage heatmaps of every gated layer, the class-to-class "
                       "path similarity matrix, class-specific vs shared filters, and chosen inputs' paths against "
                       "their predicted class's prototype to --out, as PNG + JSON, with report.md tying them together.")
    p.add_argument("--bundle", default=default_bundle)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--images", type=int, default=4, help="how many random images of --split to explain (default 4)")
    p.add_argument("--indices", type=_ints, help="explain these positions of --split instead, e.g. 3,17,42")
    p.add_argument("--image-files", nargs="+", metavar="FILE", help="explain these image files instead")
    p.add_argument("--attack-file", metavar="NPZ", help="explain the first --images adversarial images of an .npz "
                   "written by `pathguard attack` instead")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="frequency above which a filter is in a class's prototype path (default 0.5)")
    p.add_argument("--prototype-images", type=int, default=5000,
                   help="training images to compute prototypes from if the bundle has none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root")
    p.set_defaults(func=_cmd_explain)
