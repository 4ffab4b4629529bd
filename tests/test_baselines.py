"""The baseline detectors (LID, Mahalanobis, KD+BU, feature squeezing, path+Mahalanobis): estimators on data
with a known answer, the estimator contract, persistence without pickle, and one side-by-side evaluation."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.ndimage import median_filter
from scipy.spatial.distance import mahalanobis
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import KernelDensity
from threadpoolctl import threadpool_limits
from torch import nn

from detector.bundle import load_bundle
from detector.detectors import DETECTORS, FEATURIZERS, FeaturizerContext, get_detector, threshold_at_fpr
from detector.detectors.combined import ConcatFeaturizer
from detector.detectors.kdbu import KDBUFeaturizer, kde_log_density
from detector.detectors.lid import LIDFeaturizer, lid_mle
from detector.detectors.mahalanobis import (
    MahalanobisDetector,
    MahalanobisFeaturizer,
    class_gaussians,
    mahalanobis_score,
    noise_group,
    stage_end_layers,
)
from detector.detectors.squeeze import SqueezeDetector, SqueezeFeaturizer, median_smooth, reduce_bit_depth
from detector.splits import bundle_splits

BASELINES = ("lid", "mahalanobis", "kdbu", "squeeze", "path+mahalanobis")


@pytest.fixture(autouse=True, scope="module")
def _blas_threads():
    """Cap BLAS threads like torch's: on shared cores a spinning OpenBLAS thread makes small logistic
    regressions (Mahalanobis' noise selection fits dozens) several times slower."""
    with threadpool_limits(int(os.environ.get("PATHGUARD_TEST_THREADS", "2"))):
        yield


# -- estimators on data with a known answer ---------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 5, 10])
def test_lid_of_points_uniform_in_a_subspace_is_near_its_dimension(d):
    rng = np.random.default_rng(d)
    basis, _ = np.linalg.qr(rng.normal(size=(32, d)))  # a random d-dimensional subspace of R^32
    reference = rng.uniform(size=(2000, d)) @ basis.T
    queries = rng.uniform(0.25, 0.75, size=(300, d)) @ basis.T  # away from the cube's faces
    lid = lid_mle(queries, reference, k=20)
    assert abs(lid.mean() - d) < 0.15 * d, lid.mean()


def test_lid_needs_enough_neighbours():
    with pytest.raises(ValueError, match="k=30"):
        lid_mle(np.zeros((2, 3)), np.ones((20, 3)), k=30)


def test_mahalanobis_score_matches_the_closed_form():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0, 0, 0], [3, 0, -1, 2], [-2, 4, 1, 0]])
    a = rng.normal(size=(4, 4))
    cov = a @ a.T + 0.5 * np.eye(4)
    y = rng.integers(0, 3, 3000)
    f = means[y] + rng.multivariate_normal(np.zeros(4), cov, size=3000)
    mu, precision = class_gaussians(f, y, 3)
    centred = f - np.stack([f[y == c].mean(0) for c in range(3)])[y]
    np.testing.assert_allclose(mu.numpy(), np.stack([f[y == c].mean(0) for c in range(3)]), atol=1e-10)
    np.testing.assert_allclose(precision.numpy(), np.linalg.inv(centred.T @ centred / len(f)), rtol=1e-8)
    assert np.abs(precision.numpy() - np.linalg.inv(cov)).max() < 0.15  # the estimate is near the truth

    queries = rng.normal(0, 3, size=(50, 4))
    inv = np.linalg.inv(cov)
    expected = [-0.5 * min(mahalanobis(q, m, inv) ** 2 for m in means) for q in queries]
    got = mahalanobis_score(torch.from_numpy(queries), torch.from_numpy(means), torch.from_numpy(inv))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_mahalanobis_detector_picks_the_informative_noise_magnitude():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(150), np.ones(150)]
    blocks = {
        0.0: rng.normal(size=(300, 3)),
        0.001: rng.normal(size=(300, 3)) + y[:, None],
        0.002: rng.normal(size=(300, 3)),
    }
    X = np.concatenate(list(blocks.values()), axis=1)
    groups = [noise_group(e) for e in blocks for _ in range(3)]
    det = MahalanobisDetector().fit(X, y, groups=groups)
    assert det.noise_ == 0.001 and det.columns_.tolist() == [3, 4, 5]
    assert MahalanobisDetector(noise=0.002).fit(X, y, groups=groups).columns_.tolist() == [6, 7, 8]
    with pytest.raises(ValueError, match="noise=0.5"):
        MahalanobisDetector(noise=0.5).fit(X, y, groups=groups)
    with pytest.raises(ValueError, match="groups="):
        MahalanobisDetector().fit(X, y)


def test_mahalanobis_layers_are_the_stage_ends():
    from detector.models import create_model

    resnet = create_model("resnet20", num_classes=4).eval()
    names = [layer.name for layer in resnet.forward_path(torch.rand(1, 3, 32, 32)).layers]
    assert [names[i] for i in stage_end_layers(resnet, names)] == [f"stage{s}.block2.conv2" for s in (1, 2, 3)]
    vgg = create_model("vgg8", num_classes=4)
    assert stage_end_layers(vgg, vgg.layer_names) == [1, 3, 5]  # two convs per stage


def test_kde_log_density_matches_sklearn():
    rng = np.random.default_rng(0)
    ref, x = rng.normal(size=(200, 5)), rng.normal(size=(30, 5))
    expected = KernelDensity(kernel="gaussian", bandwidth=0.7).fit(ref).score_samples(x)
    np.testing.assert_allclose(kde_log_density(x, ref, 0.7).numpy(), expected, rtol=1e-8)


def test_median_smoothing_matches_scipy_and_bit_depth_quantises():
    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    for size in (2, 3, 4):
        expected = median_filter(x.numpy(), size=(1, 1, size, size), mode="reflect")
        np.testing.assert_array_equal(median_smooth(x, size).numpy(), expected)
    levels = torch.tensor([0.0, 0.2, 0.49, 0.51, 0.9, 1.0])
    assert reduce_bit_depth(levels, 1).tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(reduce_bit_depth(levels, 2) * 3, torch.tensor([0.0, 1, 1, 2, 3, 3]))


class MeanThreshold(nn.Module):
    """Class 1 exactly when the mean pixel exceeds ``t`` (steep logits); grey input."""

    in_channels = 1

    def __init__(self, t: float = 0.5) -> None:
        super().__init__()
        self.t = t

    def forward(self, x):
        z = 100 * (x.mean(dim=(1, 2, 3)) - self.t)
        return torch.stack([-z, z], dim=1)


def test_squeezing_flags_inputs_whose_squeezed_prediction_changes():
    gen = torch.Generator().manual_seed(0)
    # binary images with 19 of 64 pixels on: 1-bit squeezing changes nothing, mean 0.3 -> class 0
    clean = (torch.rand(40, 64, generator=gen).argsort(1) < 19).float().view(40, 1, 8, 8)
    flips = torch.where(clean == 0, 0.45, clean)  # mean 0.61 -> class 1; squeezed back to clean -> class 0
    stays = torch.where(clean == 0, 0.2, clean)  # mean 0.44 -> class 0 before and after squeezing
    model = MeanThreshold(0.5)
    assert (model(flips).argmax(1) == 1).all() and (model(reduce_bit_depth(flips, 1)).argmax(1) == 0).all()
    fz = SqueezeFeaturizer(model, squeezers=["bits:1"]).fit(clean, torch.zeros(40))
    s_clean, s_flips, s_stays = (fz.transform(x)[:, -1] for x in (clean, flips, stays))
    assert s_clean.max() < 1e-6 and s_flips.min() > 0.9 and s_stays.max() < 0.05
    X = np.r_[fz.transform(clean), fz.transform(flips)]
    det = SqueezeDetector(target_fpr=0.05).fit(X, np.r_[np.zeros(40), np.ones(40)], groups=fz.groups)
    held_out = (torch.rand(40, 64, generator=gen).argsort(1) < 19).float().view(40, 1, 8, 8)
    assert det.predict(fz.transform(flips)).all() and not det.predict(fz.transform(held_out)).any()


def test_default_squeezers_keep_clean_predictions():
    images = torch.full((50, 1, 8, 8), 0.4)
    # 1 bit rounds 0.4 to 0 and flips class 1 to class 0; 2 bits round it to 1/3, still above 0.3
    fz = SqueezeFeaturizer(MeanThreshold(0.3)).fit(images, torch.ones(50))
    # candidates: every bit depth that keeps clean predictions (not 1 bit), then the medians
    assert fz.squeezers_ == ("bits:2", "bits:3", "bits:4", "bits:5", "median:2", "median:3")
    assert fz.flip_rates_["bits:1"] == 1.0
    assert SqueezeFeaturizer(MeanThreshold(0.5)).fit(images, torch.zeros(50)).squeezers_[0] == "bits:1"


def test_squeeze_detector_picks_the_squeezers_that_detect_on_the_fitting_rows():
    rng = np.random.default_rng(0)
    names = ["squeeze.bits:1", "squeeze.bits:4", "squeeze.median:2", "score"]
    groups = ["squeeze", "squeeze", "squeeze", "score"]
    clean = rng.uniform(0, 0.2, (100, 4))
    adv = rng.uniform(0, 0.2, (100, 4))
    adv[:, 1] += 0.5  # only 4-bit squeezing separates them
    X, y = np.r_[clean, adv], np.r_[np.zeros(100), np.ones(100)]
    X[:, 3] = X[:, :3].max(1)
    det = SqueezeDetector(target_fpr=0.05).fit(X, y, groups=groups, names=names)
    assert det.selected_ == ["bits:4"] and det.selection_auroc_ == 1.0
    np.testing.assert_array_equal(det.decision_function(adv), adv[:, 1].clip(0, 1))
    again = SqueezeDetector.from_state(*det.to_state())
    np.testing.assert_array_equal(again.decision_function(X), det.decision_function(X))


# -- the real featurizers on the tiny bundle --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    import torchattacks

    torch.manual_seed(0)
    bundle = load_bundle(tiny_bundle)
    model = bundle.model.eval()
    splits = bundle_splits(bundle.meta)
    ref, ref_labels = splits.train.float_images(slice(0, 160)), splits.train.labels[:160]
    clean, labels = splits.val.float_images(slice(0, 48)), splits.val.labels[:48]
    adv = torchattacks.FGSM(model, eps=0.15)(clean, labels)
    return model, ref, ref_labels, clean, adv


@pytest.fixture(scope="module")
def features(tiny):
    """Per featurizer key: (fitted featurizer, X of clean then adversarial rows, y, groups)."""
    model, ref, ref_labels, clean, adv = tiny
    ctx = FeaturizerContext(model, None, ref, ref_labels, seed=0)
    out = {}
    for key in sorted({DETECTORS[name].featurizer for name in BASELINES}):
        fz = FEATURIZERS[key](ctx).fit(ref, ref_labels)
        X = np.r_[fz.transform(clean), fz.transform(adv)]
        out[key] = (fz, X, np.r_[np.zeros(len(clean)), np.ones(len(adv))], list(fz.groups))
    return out


@pytest.mark.parametrize("key", sorted({DETECTORS[name].featurizer for name in BASELINES}))
def test_featurizers_are_deterministic_and_name_every_column(tiny, features, key):
    fz, X, _, groups = features[key]
    clean = tiny[3]
    assert X.shape[1] == len(groups) and np.isfinite(X).all()
    # float32 convs vary with batch size and with the kernel the CPU picks (seen: 1.6e-5 relative)
    np.testing.assert_allclose(fz.transform(clean[:10]), X[:10], rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(fz.transform(clean[:10]), fz.transform(clean[:10]))


def test_mahalanobis_preprocessing_raises_the_score(features):
    fz, X, y, groups = features["mahalanobis"]
    g = np.asarray(groups)
    plain, stepped = X[y == 0][:, g == "noise=0"], X[y == 0][:, g == "noise=0.001"]
    assert (stepped.mean(0) > plain.mean(0)).all()  # one step up the gradient of every layer's score


def test_mahalanobis_perturbed_passes_stop_at_their_layer_with_the_full_pass_scores(tiny, features):
    """A perturbed input is scored at one layer from a pass that stops there: the score is bit-identical to the
    full pass's, and the stopped pass never runs the layers after it."""
    fz = features["mahalanobis"][0]
    model, x = tiny[0], tiny[3][:12]
    with torch.no_grad():
        full = fz._scores(model.forward_path(x))
        for j in range(len(fz.layer_index_) + 1):
            torch.testing.assert_close(fz._score_at(x, j), full[j], rtol=0, atol=0)
    ran = []
    layers = [m for _, m in model.gated_layers()]
    hooks = [m.register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i, m in enumerate(layers)]
    try:
        with torch.no_grad():
            fz._score_at(x, 0)
    finally:
        for h in hooks:
            h.remove()
    assert ran == list(range(fz.layer_index_[0] + 1))


def test_mahalanobis_rows_featurized_at_the_chosen_magnitude_score_as_with_the_whole_grid(tiny, features):
    """Rows a fitted detector only scores may be featurized at its chosen magnitude alone: those columns are
    the whole grid's, the others NaN, and the detector's scores are the same."""
    fz, X, y, groups = features["mahalanobis"]
    det = MahalanobisDetector().fit(X, y, groups=groups)
    clean = tiny[3][:10]
    part, whole = fz.transform(clean, noise=[det.noise_]), fz.transform(clean)  # same batch: same float32 kernels
    g = np.asarray(groups)
    computed = (g == noise_group(det.noise_)) | (g == "noise=0")  # noise 0 comes with the gradient pass
    np.testing.assert_array_equal(part[:, computed], whole[:, computed])
    assert (~computed).any() and np.isnan(part[:, ~computed]).all()
    np.testing.assert_array_equal(det.decision_function(part), det.decision_function(whole))
    with pytest.raises(ValueError, match="grid"):
        fz.transform(clean, noise=[0.123])


def test_kd_is_higher_on_clean_images_than_on_noise_and_bu_is_a_variance(tiny, features):
    fz, X, y, _ = features["kdbu"]
    noise = torch.rand(48, *tiny[3].shape[1:], generator=torch.Generator().manual_seed(1))
    assert fz.transform(noise)[:, 0].mean() < X[y == 0, 0].mean()
    assert (X[:, 1] >= 0).all() and X[:, 1].max() > 0
    assert fz.bandwidth_ > 0


def test_featurizer_params_are_validated(tiny):
    model = tiny[0]
    cases = [
        (lambda: LIDFeaturizer(model, k=0), "k=0"),
        (lambda: LIDFeaturizer(model, minibatch=10), "minibatch=10"),
        (lambda: MahalanobisFeaturizer(model, noise=[-0.1]), "noise="),
        (lambda: MahalanobisFeaturizer(model, layers="every"), "layers='every'"),
        (lambda: KDBUFeaturizer(model, dropout=1.0), "dropout=1.0"),
        (lambda: KDBUFeaturizer(model, mc_samples=1), "mc_samples=1"),
        (lambda: KDBUFeaturizer(model, bandwidth=0), "bandwidth=0"),
        (lambda: SqueezeFeaturizer(model, squeezers=["blur:3"]), "blur:3"),
        (lambda: SqueezeFeaturizer(model, squeezers=["bits:9"]), "bits:9"),
        (lambda: SqueezeFeaturizer(model, max_flip=1.0), "max_flip=1.0"),
        (lambda: LIDFeaturizer(model).fit(tiny[1][:50], tiny[2][:50]), "minibatch=100"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()
    for fz in (LIDFeaturizer(model), MahalanobisFeaturizer(model), KDBUFeaturizer(model), SqueezeFeaturizer(model)):
        with pytest.raises(NotFittedError):
            fz.transform(tiny[3][:2])


def test_concat_refuses_clashing_groups(tiny):
    model, ref, ref_labels, clean, _ = tiny
    both = ConcatFeaturizer([SqueezeFeaturizer(model), SqueezeFeaturizer(model)]).fit(ref, ref_labels)
    with pytest.raises(ValueError, match="'squeeze' is produced by parts 0 and 1"):
        both.transform(clean[:2])


def test_combined_features_built_from_the_parts_equal_featurizing_again(tiny):
    from detector.evaluation.analysis import concat_feature_sets, featurize
    from detector.evaluation.images import ImageSet, ImageSets

    model, ref, ref_labels, clean, adv = tiny
    ctx = FeaturizerContext(model, None, ref, ref_labels, seed=0)

    def part(images, labels):
        return ImageSet("val", torch.arange(len(images)), images, labels)

    labels = model(clean).argmax(1)
    sets = ImageSets(
        part(clean[:16], labels[:16]),
        part(clean[16:32], labels[16:32]),
        part(clean[32:], labels[32:]),
        part(ref, ref_labels),
    )
    attacked = {"fgsm": torch.cat([adv[16:32], adv[32:]])}  # fitting images first, then evaluation images
    fitted = {k: FEATURIZERS[k](ctx).fit(ref, ref_labels) for k in ("squeeze", "lid")}
    direct = featurize(ConcatFeaturizer([fitted["squeeze"], fitted["lid"]]), sets, attacked)
    built = concat_feature_sets([featurize(fitted[k], sets, attacked) for k in ("squeeze", "lid")])
    assert built.groups == direct.groups
    for name in ("calibration", "fit_clean", "eval_clean"):
        np.testing.assert_allclose(getattr(built, name), getattr(direct, name), rtol=1e-5)
    np.testing.assert_allclose(built.fit_adv["fgsm"], direct.fit_adv["fgsm"], rtol=1e-5)
    np.testing.assert_allclose(built.eval_adv["fgsm"], direct.eval_adv["fgsm"], rtol=1e-5)


# -- the estimator contract, driven by the registry -------------------------------------------------------------
BAD_PARAMS = {
    "lid": [({"target_fpr": 1.5}, "target_fpr=1.5"), ({"classifier": "svm"}, "classifier='svm'")],
    "mahalanobis": [({"noise": -0.001}, "noise=-0.001"), ({"cv": 1}, "cv=1"), ({"C": 0}, "C=0")],
    "kdbu": [({"C": -1.0}, "C=-1.0"), ({"max_depth": 0}, "max_depth=0")],
    "squeeze": [({"classifier": "svm"}, "classifier='svm'"), ({"target_fpr": 0}, "target_fpr=0")],
    "path+mahalanobis": [
        ({"feature_groups": ["pixels"]}, "feature_groups="),
        ({"classifier": "identity"}, "identity"),
        ({"cv": 0}, "cv=0"),
    ],
}


@pytest.mark.parametrize("name", BASELINES)
def test_contract(features, name):
    _, X, y, groups = features[DETECTORS[name].featurizer]
    det = get_detector(name).make(0.05, 0)
    for method in (det.decision_function, det.predict, det.predict_proba):
        with pytest.raises(NotFittedError):
            method(X)
    # Every other clean row is held out of fitting and calibrates the threshold instead.
    held = np.zeros(len(X), bool)
    held[np.flatnonzero(y == 0)[1::2]] = True
    X_cal = X[held]
    assert det.fit(X[~held], y[~held], groups=groups, X_calibration=X_cal) is det
    s = det.decision_function(X)
    assert s.shape == (len(X),) and s.min() >= 0 and s.max() <= 1
    np.testing.assert_array_equal(det.predict(X), (s > det.threshold_).astype(int))
    np.testing.assert_allclose(det.predict_proba(X), np.column_stack([1 - s, s]))
    # the threshold comes from the calibration rows (not the fitting rows) at the target rate
    assert det.threshold_ == threshold_at_fpr(det.decision_function(X_cal), 0.05)
    assert det.predict(X_cal).mean() <= 0.05
    assert s[y == 1].mean() > s[y == 0].mean()  # FGSM examples score higher than their clean sources
    with pytest.raises(ValueError, match="features"):
        det.decision_function(X[:, :-1])
    for params, match in BAD_PARAMS[name]:
        with pytest.raises(ValueError, match=match):
            get_detector(name).make(0.05, 0).set_params(**params).fit(X, y, groups=groups)


@pytest.mark.parametrize("name", BASELINES)
def test_round_trip_without_pickle_gives_identical_scores(features, name, tmp_path):
    _, X, y, groups = features[DETECTORS[name].featurizer]
    det = get_detector(name).make(0.05, 0).fit(X, y, groups=groups)
    tensors, info = det.to_state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "d.safetensors")
    (tmp_path / "d.json").write_text(json.dumps(info))
    loaded = type(det).from_state(load_file(tmp_path / "d.safetensors"), json.loads((tmp_path / "d.json").read_text()))
    np.testing.assert_array_equal(loaded.decision_function(X), det.decision_function(X))
    assert loaded.threshold_ == det.threshold_ and loaded.get_params() == det.get_params()
    if isinstance(det, MahalanobisDetector):
        assert loaded.noise_ == det.noise_


# -- side by side in one evaluation -----------------------------------------------------------------------------
def test_evaluation_reports_every_baseline(tiny_bundle, tmp_path):
    from detector.evaluation import EvalConfig, run

    names = ("path", *BASELINES)
    cfg = EvalConfig(
        bundle=str(tiny_bundle),
        attacks="fgsm:eps=0.15",
        detectors=names,
        n=24,
        n_fit=24,
        n_calibration=24,
        n_reference=100,
        batch_size=32,
        ablation=False,
        leave_one_out=False,
        plots=False,
    )
    report = run(cfg, tmp_path, progress=False)
    md = (tmp_path / "report.md").read_text()
    for name in names:
        m = report["results"][name]["fgsm:eps=0.15"]
        assert m["n_adv"] > 0 and 0 <= m["tpr_at_fpr"] <= 1
        assert m["auroc"] > (0.6 if name == "squeeze" else 0.8), (name, m["auroc"])
        timing = report["timing"]["detectors"][name]
        assert timing["score_cost_ratio"] > 0 and timing["fit_seconds"] >= 0
        assert f"| {name} |" in md
    # Mahalanobis pre-processing costs gradient steps: dearer than one pass, dearer than LID
    cost = {n: report["timing"]["detectors"][n]["score_cost_ratio"] for n in names}
    assert cost["mahalanobis"] > max(cost["lid"], 1.0)
