"""The input group of the path features and the input-consistency detector that reads it: an image that looks
like one class (its own pixels, against clean images) while the network predicts another is flagged, with no
adversarial label anywhere in the fit; bundles saved before the group keep their feature layout."""

import dataclasses

import numpy as np
import pytest
import torch

from detector.bundle import load_bundle
from detector.detectors import detector_from_state
from detector.detectors.input_consistency import InputConsistencyDetector
from detector.features import INPUT, extract_path_features, feature_layout, path_features
from detector.prototypes import Prototypes

K, SIDE = 3, 6


def _rows(n, seed, swap=False):
    """Feature rows of synthetic 6x6 images: class c is a bright band at rows 2c-2c+1 plus noise; the logits
    columns predict the class (``swap``: the next class, the image unchanged)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(K, size=n)
    img = rng.normal(0, 0.15, size=(n, SIDE, SIDE))
    for c in range(K):
        img[y == c, 2 * c : 2 * c + 2, :] += 1.0
    pred = (y + 1) % K if swap else y
    logits = np.eye(K)[pred] * 4.0
    X = np.hstack([rng.random((n, 2)), logits, img.reshape(n, -1)])
    groups = ["soft", "soft"] + ["logits"] * K + [INPUT] * SIDE * SIDE
    return X, groups


def test_input_consistency_flags_an_image_predicted_as_another_class_without_adversarial_labels():
    X, groups = _rows(600, 0)
    X_cal, _ = _rows(300, 1)
    det = InputConsistencyDetector(n_components=8, k=5, max_reference=150)
    with pytest.raises(ValueError, match="clean"):
        det.fit(X, np.ones(len(X)), groups=groups, layer_sizes=[2])
    det.fit(X, groups=groups, layer_sizes=[2], X_calibration=X_cal)
    assert det.reference_.shape == (3 * 150, 8) and np.all(np.diff(det.reference_class_) >= 0)
    clean, _ = _rows(300, 2)
    odd, _ = _rows(300, 3, swap=True)
    s_clean, s_odd = det.decision_function(clean), det.decision_function(odd)
    assert s_odd.min() > s_clean.max()
    assert det.predict(clean).mean() < 0.15 and det.predict(odd).mean() == 1.0
    again = detector_from_state(*det.to_state())
    np.testing.assert_array_equal(again.decision_function(odd), s_odd)


def test_input_consistency_rejects_bad_parameters_and_missing_input_columns():
    X, groups = _rows(200, 0)
    with pytest.raises(ValueError, match="n_components"):
        InputConsistencyDetector(n_components=0).fit(X, groups=groups, layer_sizes=[2])
    without_input = [g for g in groups if g != INPUT]
    with pytest.raises(ValueError, match="input"):
        InputConsistencyDetector().fit(X[:, : len(without_input)], groups=without_input, layer_sizes=[2])


def test_the_input_group_is_last_and_only_where_the_prototypes_ask_for_it(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    old = dataclasses.replace(Prototypes.from_state(*bundle.part("prototypes")), input_size=0)
    size = int(np.prod(bundle.input_shape))
    new = dataclasses.replace(old, input_size=size)
    images = torch.rand(4, *bundle.input_shape)
    f_old = extract_path_features(bundle.model, old, images)
    f_new = extract_path_features(bundle.model, new, images)
    assert INPUT not in f_old.groups
    assert f_new.groups[: len(f_old.groups)] == f_old.groups and f_new.groups[len(f_old.groups) :] == [INPUT] * size
    assert f_new.groups == feature_layout(new.layer_names, new.layer_sizes, bundle.model.num_classes, size)[0]
    np.testing.assert_array_equal(f_new.X[:, : f_old.X.shape[1]], f_old.X)
    np.testing.assert_allclose(f_new.X[:, f_old.X.shape[1] :], images.flatten(1).numpy(), rtol=0, atol=1e-7)
    with torch.no_grad():
        out = bundle.model.forward_path(images)
    with pytest.raises(ValueError, match="need the input images"):
        path_features(out, new)
    again = Prototypes.from_state(*new.to_state())
    assert again.input_size == size
    tensors, info = old.to_state()
    info.pop("input_size")
    assert Prototypes.from_state(tensors, info).input_size == 0  # prototypes saved before the group
