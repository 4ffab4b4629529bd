"""Detection metrics: AUROC, TPR and FPR at a calibrated threshold, detection accuracy."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def detection_metrics(clean: np.ndarray, adv: np.ndarray, threshold: float) -> dict:
    """Scores of clean and adversarial images -> metrics; flagged means score > threshold."""
    if len(adv) == 0:
        return {
            "auroc": None,
            "tpr_at_fpr": None,
            "fpr_at_threshold": float(np.mean(clean > threshold)),
            "detection_accuracy": None,
            "n_clean": int(len(clean)),
            "n_adv": 0,
        }
    y = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    s = np.r_[clean, adv]
    tp, fp = np.sum(adv > threshold), np.sum(clean > threshold)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "tpr_at_fpr": float(tp / len(adv)),
        "fpr_at_threshold": float(fp / len(clean)),
        "detection_accuracy": float((tp + len(clean) - fp) / (len(clean) + len(adv))),
        "n_clean": int(len(clean)),
        "n_adv": int(len(adv)),
    }


def roc_points(clean: np.ndarray, adv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    fpr, tpr, _ = roc_curve(y, np.r_[clean, adv])
    return fpr, tpr
