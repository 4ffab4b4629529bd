"""``pathguard explain`` and the numbers behind its pictures."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_images

from detector.interpret import analysis
from detector.prototypes import Prototypes


def _protos(freq):
    freq = torch.as_tensor(freq, dtype=torch.float32)
    return Prototypes(freq, freq.clone(), torch.ones(freq.shape[0]), [freq.shape[1]], ["layer"])


def test_jaccard_and_cosine_by_hand():
    on = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    jac = analysis.jaccard_matrix(on)
    assert jac[0, 1] == pytest.approx(1 / 3)  # {0,1} vs {1,2}
    assert jac[0, 2] == 0 and jac[2, 2] == 1  # an empty set is identical to itself only
    freq = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    cos = analysis.cosine_matrix(freq)
    assert cos[0, 1] == pytest.approx(1 / np.sqrt(2), rel=1e-6)
    assert torch.equal(cos.diagonal(), torch.ones(3)) and cos[0, 2] == 0
    with pytest.raises(ValueError, match="method='l2'"):
        analysis.similarity(freq, "l2")


def test_specificity_kinds():
    # 4 classes, 4 filters: used by none / one / two / all
    freq = torch.tensor([[0.1, 0.9, 0.9, 0.8], [0.0, 0.2, 0.7, 0.9], [0.2, 0.1, 0.3, 0.9], [0.0, 0.0, 0.1, 0.6]])
    spec = analysis.specificity(freq)
    assert spec.users.tolist() == [0, 1, 2, 4]
    assert spec.kind(4) == ["unused", "specific", "some", "shared"]
    assert spec.owner[1] == 0
    assert spec.selectivity[1] > spec.selectivity[3]
    assert ((spec.selectivity >= 0) & (spec.selectivity <= 1)).all()


def test_departures_against_prototype():
    from detector.models import LayerPath, PathOutput

    protos = _protos([[1, 1, 0, 0], [0, 0, 1, 1]])
    hard = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    layer = LayerPath("layer", hard, hard, hard, hard, torch.ones(1), 1)
    out = PathOutput(torch.tensor([[2.0, 1.0]]), [layer], hard, torch.ones(1), 1)
    (dep,) = analysis.departures(out, protos)
    assert dep.predicted == 0
    assert dep.hamming.tolist() == [0.5]
    assert dep.extra == [[3]] and dep.missing == [[1]]
    assert dep.hamming_all[0].tolist() == [0.5, 0.5]


def _links(report: Path) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", report.read_text())


def _check_outputs(out: Path, index: dict, n_inputs: int) -> None:
    for name in (
        "report.md",
        "index.json",
        "similarity.png",
        "similarity.json",
        "specificity.png",
        "specificity.json",
        "usage_overview.png",
        "usage_overview.json",
    ):
        assert (out / name).is_file(), name
    links = _links(out / "report.md")
    assert links and all((out / link).is_file() for link in links), [k for k in links if not (out / k).is_file()]
    layers = index["layers"]
    assert [f["layer"] for f in index["files"]["usage"]["layers"]] == layers
    for f in index["files"]["usage"]["layers"]:
        assert (out / f["png"]).stat().st_size > 1000
        freq = np.array(json.loads((out / f["json"]).read_text())["frequency"])
        assert freq.shape[0] == len(index["classes"]) and ((freq >= 0) & (freq <= 1)).all()
    sim = json.loads((out / "similarity.json").read_text())
    for method in ("jaccard", "cosine"):
        mats = [np.array(sim[method])] + [np.array(v[method]) for v in sim["per_layer"].values()]
        for m in mats:
            np.testing.assert_array_equal(m, m.T)
            np.testing.assert_allclose(np.diag(m), 1.0)
            assert ((m >= 0) & (m <= 1)).all()
    spec = json.loads((out / "specificity.json").read_text())
    kinds = ("unused", "specific", "some", "shared")
    assert sum(spec[k] for k in kinds) == spec["filters"] == sum(index["layer_sizes"])
    assert len(index["inputs"]) == n_inputs
    for s in index["inputs"]:
        detail = json.loads((out / s["json"]).read_text())
        assert [layer["layer"] for layer in detail["layers"]] == layers
        assert all(0 <= layer["hamming_to_predicted"] <= 1 for layer in detail["layers"])


def test_explain_command_writes_everything(tiny_bundle, tmp_path):
    # one full run (figures are the slow part): a bundle without prototypes, and an image file of another size
    from PIL import Image

    from detector.bundle import write_part
    from pathguard.main import main

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    write_part(copy, "prototypes", tensors=None, info=None)
    image = (make_images(1, seed=11)[0][0, 0] * 255).astype(np.uint8)
    png = tmp_path / "square.png"
    Image.fromarray(image).resize((20, 20)).save(png)  # explain resizes it to 16x16
    out = tmp_path / "explain"
    assert (
        main(
            [
                "explain",
                "--bundle",
                str(copy),
                "--out",
                str(out),
                "--image-files",
                str(png),
                "--prototype-images",
                "200",
            ]
        )
        == 0
    )
    index = json.loads((out / "index.json").read_text())
    _check_outputs(out, index, 1)
    assert index["prototypes"].startswith("computed now from the first 200 training images")
    assert index["inputs"][0]["true"] is None and index["inputs"][0]["input"] == "file square.png"


def test_prototypes_part_is_used_and_inputs_chosen_by_index(tiny_bundle, tmp_path):
    from detector import load_bundle
    from detector.interpret import ExplainConfig, bundle_prototypes, explain
    from detector.interpret.explainer import _chosen_inputs

    bundle = load_bundle(tiny_bundle)
    protos, source = bundle_prototypes(bundle)
    assert "prototypes part" in source
    assert torch.equal(protos.frequency, bundle.prototypes().frequency)
    cfg = ExplainConfig(bundle=str(tiny_bundle), out=str(tmp_path / "o"), indices=(0, 5))
    images, labels, names = _chosen_inputs(cfg, bundle)
    assert images.shape == (2, 1, 16, 16) and all(isinstance(v, int) for v in labels)
    assert names[0].endswith("#0") and names[1].endswith("#5")
    with pytest.raises(ValueError, match="indices \\[99999\\] are outside"):
        explain(ExplainConfig(bundle=str(tiny_bundle), out=str(tmp_path / "o"), indices=(99999,)))
    assert not (tmp_path / "o").exists(), "a bad index fails before anything is written"
    with pytest.raises(ValueError, match="threshold=1.5"):
        ExplainConfig(bundle=str(tiny_bundle), out=str(tmp_path / "o"), threshold=1.5)


def test_adversarial_inputs_from_an_attack_file(tiny_bundle, tmp_path):
    from detector import load_bundle
    from detector.attacks import AttackSpec, run_attack, save_result
    from detector.interpret import ExplainConfig
    from detector.interpret.explainer import _chosen_inputs

    bundle = load_bundle(tiny_bundle)
    x = torch.from_numpy(make_images(3, seed=12)[0])
    y = torch.tensor([0, 1, 2])
    res = run_attack(bundle.model, x, y, AttackSpec("fgsm", {"eps": 0.1}), progress=False)
    save_result(tmp_path / "fgsm.npz", res)
    cfg = ExplainConfig(
        bundle=str(tiny_bundle), out=str(tmp_path / "o"), images=2, attack_file=str(tmp_path / "fgsm.npz")
    )
    images, labels, names = _chosen_inputs(cfg, bundle)
    assert images.shape == (2, 1, 16, 16) and labels == [0, 1]
    assert names == ["fgsm adversarial #0", "fgsm adversarial #1"]
    torch.testing.assert_close(images, res.adversarial[:2])
