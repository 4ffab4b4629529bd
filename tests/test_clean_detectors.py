"""Clean-only path detectors and their non-negative combination: fitted without any adversarial label, they
flag paths that no clean image takes; the combination's weights stay >= 0; everything round-trips."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detector.bundle import load_bundle
from detector.detectors import DETECTORS, PathEnsembleDetector, detector_from_state
from detector.detectors.joint import PathOutputKNNDetector
from detector.features import PROTO, extract_path_features, prototype_distances
from detector.prototypes import Prototypes
from detector.splits import bundle_splits

CLEAN_ONLY = sorted(n for n, e in DETECTORS.items() if getattr(e.make(0.05, 0), "clean_only", False))


def _bundle_paths(path, sizes=None):
    """Path features of correctly classified (as the evaluation uses) training, validation and test images:
    ``sizes`` of each split, all of them by default."""
    bundle = load_bundle(path)
    # with the input group, as fit-detector computes prototypes since stop 35 (the committed ones may predate it)
    protos = dataclasses.replace(
        Prototypes.from_state(*bundle.part("prototypes")), input_size=int(np.prod(bundle.input_shape))
    )
    splits = bundle_splits(bundle.meta, None)
    out = {}
    for name, data in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        n = (sizes or {}).get(name, len(data))
        f = extract_path_features(bundle.model, protos, data.float_images(torch.arange(n)))
        keep = (f.logits.argmax(1) == data.labels[:n]).numpy()
        out[name] = (f.X[keep], data.labels[:n].numpy()[keep])
    return out, f.groups, f.names, protos


@pytest.fixture(scope="module")
def paths(tiny_bundle):
    return _bundle_paths(tiny_bundle)


def _layer_columns(names, protos, layer):
    per_layer = [n for n in names if n.startswith((f"soft.{layer}.", f"hard.{layer}."))]
    per_layer += [f"density.{layer}"] + [f"{d}.{layer}" for d in PROTO]
    return [names.index(n) for n in per_layer]


def spliced(X, y, names, protos, n_early, seed=0):
    """Rows whose input and first ``n_early`` gated layers come from an image of one class and the rest of the
    path (and the prediction) from an image of another class: the early-shirt, late-bag path an attack leaves.
    Each row's prototype distances are then measured again, against the prototypes of the class the row predicts,
    as the featurizer would for an input that took this path."""
    rng = np.random.default_rng(seed)
    early = [i for i, n in enumerate(names) if n.startswith("input.")]
    early += [c for layer in protos.layer_names[:n_early] for c in _layer_columns(names, protos, layer)]
    rows = []
    for _ in range(200):
        a = rng.integers(len(X))
        b = rng.choice(np.flatnonzero(y != y[a]))
        row = X[b].copy()
        row[early] = X[a, early]
        rows.append(row)
    return _remeasure_prototype_distances(np.asarray(rows), names, protos)


def _remeasure_prototype_distances(X, names, protos):
    def cols(prefix):
        return [i for i, n in enumerate(names) if n.startswith(prefix)]

    path = SimpleNamespace(
        soft_path=torch.as_tensor(X[:, cols("soft.")], dtype=torch.float32),
        hard_path=torch.as_tensor(X[:, cols("hard.")], dtype=torch.float32),
        logits=torch.as_tensor(X[:, cols("logit.")], dtype=torch.float32),
    )
    dist = prototype_distances(path, protos).flatten(1).numpy()  # columns ordered as the featurizer's
    out = X.copy()
    out[:, [names.index(f"{d}.{layer}") for layer in protos.layer_names for d in PROTO]] = dist
    return out


def _check_flags_inconsistent(name, data, groups, names, protos, n_early, min_auroc):
    (X_train, _), (X_val, _), (X_test, y_test) = data["train"], data["val"], data["test"]
    est = DETECTORS[name].make(0.05, 0)
    with pytest.raises(ValueError, match="clean"):
        est.fit(X_train, np.ones(len(X_train)), groups=groups, layer_sizes=protos.layer_sizes)
    est.fit(X_train, groups=groups, layer_sizes=protos.layer_sizes, X_calibration=X_val)  # no label at all
    clean = est.decision_function(X_test)
    odd_rows = spliced(X_test, y_test, names, protos, n_early)
    odd = est.decision_function(odd_rows)
    assert np.all((clean >= 0) & (clean < 1)) and np.all((odd >= 0) & (odd < 1))
    auroc = (odd[:, None] > clean[None, :]).mean() + 0.5 * (odd[:, None] == clean[None, :]).mean()
    assert auroc > min_auroc, f"{name}: spliced paths vs clean AUROC {auroc:.3f}"
    assert est.predict(X_test).mean() < 0.15  # calibrated on other clean images at 5%: few clean flags
    assert est.predict(odd_rows).mean() > 2 * est.predict(X_test).mean()


# The tiny model keeps almost every gate on (density ~0.99) and its early layers barely depend on the class, so
# only its soft path, and only in the last layer, says which class an image follows: the spliced input there is
# "every layer from one class's image, the last layer and the prediction from another's".
SOFT_PATH = [
    n for n in CLEAN_ONLY if n in ("clean-gaussian", "clean-knn", "clean-joint", "clean-layer", "clean-ensemble")
]


@pytest.mark.parametrize("name", SOFT_PATH)
def test_clean_only_detector_flags_a_late_switch_on_the_tiny_model(paths, name):
    data, groups, names, protos = paths
    _check_flags_inconsistent(name, data, groups, names, protos, len(protos.layer_names) - 1, 0.9)


@pytest.fixture(scope="module")
def default_paths(default_bundle):
    """The default bundle (Fashion-MNIST): 3000 training, 500 validation, 500 test images."""
    return _bundle_paths(default_bundle, {"train": 3000, "val": 500, "test": 500})


# On the default model the class shows mostly in the last gated layer too (measured: splicing at the middle gives
# AUROC 0.6-0.9), so the spliced input is again "early layers from one class's image, the last layer and the
# prediction from another's". The summary detector reads per-layer statistics and confidence, not the filters:
# it is checked on the path of one class under the prediction of another (every layer from the first image), its
# prototype distances measured against the predicted class's prototypes.
SPLICES = {"clean-summary": (0, 0.9)}


PATH_SCORES = [n for n in CLEAN_ONLY if n != "clean-margin"]  # clean-margin reads the softmax alone


@pytest.mark.parametrize("name", PATH_SCORES)
def test_clean_only_detector_flags_an_early_shirt_late_bag_path(default_paths, name):
    data, groups, names, protos = default_paths
    late_layers, min_auroc = SPLICES.get(name, (1, 0.9))
    _check_flags_inconsistent(name, data, groups, names, protos, len(protos.layer_names) - late_layers, min_auroc)


def test_ensemble_weights_are_non_negative_and_chosen_on_validation(paths):
    (X_train, _), (X_val, y_val), (X_test, _) = paths[0]["train"], paths[0]["val"], paths[0]["test"]
    groups, names, protos = paths[1], paths[2], paths[3]
    half = len(X_val) // 2
    validation = (
        X_val[:half],
        {
            "spliced-early": spliced(X_val[half:], y_val[half:], names, protos, 2, seed=1),
            "spliced-late": spliced(X_val[half:], y_val[half:], names, protos, 4, seed=2),
        },
    )
    clean_only = ("knn", "summary", "margin", "layer", "bernoulli")
    est = PathEnsembleDetector(components=clean_only, target_fpr=0.05).fit(
        X_train, groups=groups, layer_sizes=protos.layer_sizes, X_calibration=X_val[half:], validation=validation
    )
    assert np.all(est.weights_ >= 0) and est.weights_.max() > 0
    assert est.selection_["families"] == ["spliced-early", "spliced-late"]
    assert all(min(r["weights"]) >= 0 for r in [est.selection_["chosen"]])
    # raising any component's -log p can only raise the combined score (monotone, so no sign flip is learnable)
    t = est.component_scores(X_test)
    for i in range(t.shape[1]):
        bumped = t + np.eye(t.shape[1])[i] * 5.0
        assert np.all(est._combined(bumped, est.weights_) >= est._combined(t, est.weights_))
    with pytest.raises(ValueError, match="weights"):
        PathEnsembleDetector(components=clean_only, weights=(1.0, -0.5, 1.0, 1.0, 1.0)).fit(
            X_train, groups=groups, layer_sizes=protos.layer_sizes
        )
    with pytest.raises(ValueError, match="validation"):
        PathEnsembleDetector(components=clean_only).fit(X_train, groups=groups, layer_sizes=protos.layer_sizes)


@pytest.mark.parametrize("name", CLEAN_ONLY)
def test_clean_only_state_round_trip(paths, name):
    (X_train, _), (X_val, _), (X_test, _) = paths[0]["train"], paths[0]["val"], paths[0]["test"]
    est = (
        DETECTORS[name]
        .make(0.05, 0)
        .fit(X_train, groups=paths[1], layer_sizes=paths[3].layer_sizes, X_calibration=X_val)
    )
    tensors, info = est.to_state()
    again = detector_from_state(tensors, info)
    np.testing.assert_array_equal(again.decision_function(X_test), est.decision_function(X_test))
    assert again.threshold_ == est.threshold_


def test_low_margin_detector_flags_undecided_outputs(paths):
    (X_train, _), (X_val, _), (X_test, _) = paths[0]["train"], paths[0]["val"], paths[0]["test"]
    groups = np.asarray(paths[1])
    est = (
        DETECTORS["clean-margin"]
        .make(0.05, 0)
        .fit(X_train, groups=groups, layer_sizes=paths[3].layer_sizes, X_calibration=X_val)
    )
    undecided = X_test.copy()
    logits = undecided[:, groups == "logits"]
    top2 = np.argsort(logits, axis=1)[:, -2:]
    rows = np.arange(len(logits))
    logits[rows, top2[:, 0]] = logits[rows, top2[:, 1]] - 0.01  # runner-up almost as likely as the top class
    undecided[:, groups == "logits"] = logits
    assert est.predict(undecided).mean() > 0.9 and est.predict(X_test).mean() < 0.15


def _undecided(X, groups):
    """Rows X with the runner-up logit raised to just below the top one, and the confidence columns recomputed:
    a boundary output (where CW and DeepFool stop) on a path that a clean image of the class took."""
    from detector.features import confidence_features

    out, groups = X.copy(), np.asarray(groups)
    logits = out[:, groups == "logits"]
    top2 = np.argsort(logits, axis=1)[:, -2:]
    rows = np.arange(len(logits))
    logits[rows, top2[:, 0]] = logits[rows, top2[:, 1]] - 0.01
    out[:, groups == "logits"] = logits
    out[:, groups == "confidence"] = confidence_features(torch.from_numpy(logits)).numpy()
    return out


def test_joint_knn_flags_a_boundary_output_on_a_clean_path_without_adversarial_labels(paths):
    (X_train, _), (X_val, _), (X_test, _) = paths[0]["train"], paths[0]["val"], paths[0]["test"]
    groups, layer_sizes = paths[1], paths[3].layer_sizes
    est = DETECTORS["clean-joint"].make(0.05, 0)
    with pytest.raises(ValueError, match="clean"):
        est.fit(X_train, np.ones(len(X_train)), groups=groups, layer_sizes=layer_sizes)
    est.fit(X_train, groups=groups, layer_sizes=layer_sizes, X_calibration=X_val)
    undecided = _undecided(X_test, groups)
    assert est.predict(undecided).mean() > 0.9 and est.predict(X_test).mean() < 0.15
    # the path is a clean image's: on the path alone they pass as clean; the log-margin block alone flags them
    fit = {"groups": groups, "layer_sizes": layer_sizes, "X_calibration": X_val}
    path_only = PathOutputKNNDetector(logit_weight=0.0, margin_weight=0.0).fit(X_train, **fit)
    margin_too = PathOutputKNNDetector(logit_weight=0.0).fit(X_train, **fit)
    assert path_only.predict(undecided).mean() < 0.15 and margin_too.predict(undecided).mean() > 0.9
    with pytest.raises(ValueError, match="margin_weight"):
        PathOutputKNNDetector(margin_weight=-0.1).fit(X_train, groups=groups, layer_sizes=layer_sizes)


def test_an_ensemble_with_the_joint_score_ships_in_a_bundle(paths, tiny_bundle, tmp_path):
    """Written as a bundle part (safetensors + JSON, checked on load) and read back, it scores the same."""
    import shutil

    from detector.bundle import write_part

    (X_train, _), (X_val, _), (X_test, _) = paths[0]["train"], paths[0]["val"], paths[0]["test"]
    det = PathEnsembleDetector(components=("joint", "margin"), weights=(1.0, 0.5)).fit(
        X_train, groups=paths[1], layer_sizes=paths[3].layer_sizes, X_calibration=X_val
    )
    assert det.clean_only
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    tensors, info = det.to_state()
    write_part(copy, "detector", tensors=tensors, info=info)
    again = load_bundle(copy).detector()
    assert isinstance(again.components_[0], PathOutputKNNDetector)
    np.testing.assert_array_equal(again.decision_function(X_test), det.decision_function(X_test))
