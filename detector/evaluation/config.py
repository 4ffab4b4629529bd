"""Settings of one offline evaluation run (``pathguard evaluate``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields


@dataclass
class EvalConfig:
    """What to attack, which detectors to compare, and on which images.

    Image sets (METHOD.md section 4), all of correctly classified images and pairwise disjoint:
    ``n`` test images are attacked and scored (none used in fitting); ``n_fit`` validation-split images
    and their adversarial versions fit the detectors; ``n_calibration`` other clean validation images set
    each detector's threshold at ``target_fpr``.
    """

    bundle: str = ""
    # The default matrix: every family of FAMILIES, two PGD budgets (comma-separated specs; a parameter list
    # follows a colon, items separated by ";").
    attacks: str = "fgsm,pgd,pgd:eps=0.05,apgd,pgdl2,cw,deepfool,square"
    # Clean-only detectors first (every attack unseen), the shipped recipe (path-ensemble) and the previous one
    # (path-ensemble-clean: clean-only scores, weights on validation), then the supervised path detectors and the
    # baselines. path-rf and path+mahalanobis stay registered but out of the default
    # run, which must fit in 20 minutes on 2 cores with the wider attack matrix.
    detectors: tuple[str, ...] = (
        "clean-bernoulli",
        "clean-gaussian",
        "clean-knn",
        "clean-joint",
        "clean-input",
        "clean-layer",
        "clean-summary",
        "clean-margin",
        "clean-ensemble",
        "path-ensemble",
        "path-ensemble-clean",
        "bundle",
        "path",
        "path-gb",
        "confidence",
        "lid",
        "mahalanobis",
        "kdbu",
        "squeeze",
    )
    n: int = 500  # test images per attack (500 keeps the default matrix of 8 attacks under 20 min on 2 cores)
    n_fit: int = 500  # validation images whose attacks fit the detectors
    n_calibration: int = 1000  # clean validation images for thresholds
    n_reference: int = 20000  # clean training images for featurizers and the clean-only detectors
    target_fpr: float = 0.05
    seed: int = 0
    batch_size: int = 250  # attack batch; shards split on these batches
    data_root: str | None = None
    cache_dir: str | None = None  # reuse attacks across runs (unsharded runs only)
    ablation: bool = True  # path feature-group ablation
    leave_one_out: bool = True  # leave-one-attack-out matrix
    leave_one_family_out: bool = True  # fit without each attack family, score on it
    plots: bool = True

    def __post_init__(self) -> None:
        self.detectors = tuple(self.detectors)
        for name in ("n", "n_fit", "n_calibration", "n_reference", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"target_fpr={self.target_fpr} must be in (0, 1)")
        if not self.detectors:
            raise ValueError("detectors must name at least one detector")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["detectors"] = list(self.detectors)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def digest(self) -> str:
        """Hash of everything that decides the adversarial images (shards must agree on it)."""
        keys = ("bundle", "attacks", "n", "n_fit", "n_calibration", "seed", "batch_size")
        return hashlib.sha256(json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]
