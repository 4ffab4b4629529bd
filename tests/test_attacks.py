"""Every registered attack keeps its budget; runs are seeded per batch and cached."""

import pytest
import torch
from synthetic import make_images

from detector import load_bundle
from detector.attacks import ATTACKS, AttackSpec, cached_attack, parse_attack, parse_attacks, run_attack

SMALL = {
    "bim": {"steps": 3},
    "pgd": {"steps": 3},
    "pgdl2": {"steps": 3},
    "cw": {"steps": 10, "c": 10.0, "lr": 0.1},
    "deepfool": {"steps": 3},
    "apgd": {"steps": 3},
}


@pytest.fixture(scope="module")
def model_and_data(tiny_bundle):
    model = load_bundle(tiny_bundle).model
    x, y = make_images(12, seed=9)
    return model, torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_keeps_budget_and_range(model_and_data, name):
    model, x, y = model_and_data
    spec = AttackSpec(name, SMALL.get(name, {}))
    res = run_attack(model, x, y, spec, batch_size=6, progress=False)
    adv = res.adversarial
    assert adv.shape == x.shape
    assert adv.min() >= 0 and adv.max() <= 1
    pert = res.perturbation(x)
    if spec.norm == "linf":
        assert float(pert["linf"].max()) <= spec.budget + 1e-5
    elif spec.norm == "l2":
        assert float(pert["l2"].max()) <= spec.budget + 1e-4
    assert float(pert["l2"].max()) > 0, "the attack changed nothing"


def test_batches_are_seeded_independently(model_and_data):
    model, x, y = model_and_data
    spec = AttackSpec("pgd", {"steps": 2})
    full = run_attack(model, x, y, spec, batch_size=4, seed=3, progress=False).adversarial
    part = run_attack(model, x, y, spec, batch_size=4, seed=3, batches=[1], progress=False).adversarial
    assert torch.equal(full[4:8], part[4:8])
    assert torch.equal(part[:4], x[:4]), "batches outside the shard stay clean"


def test_cache_reuses_result(model_and_data, tmp_path):
    model, x, y = model_and_data
    spec = AttackSpec("pgd", {"steps": 2})
    a = cached_attack(model, "digest", x, y, spec, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("pgd-*.npz"))
    assert len(files) == 1
    b = cached_attack(model, "digest", x, y, spec, cache_dir=tmp_path, progress=False)
    assert torch.equal(a.adversarial, b.adversarial)
    c = cached_attack(model, "digest", x, y, AttackSpec("pgd", {"steps": 3}), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("pgd-*.npz"))) == 2
    assert not torch.equal(a.adversarial, c.adversarial)
    # a cache file is only ever read back as the attack it holds
    from detector.attacks.runner import load_result, read_result

    adv, labels, meta = read_result(files[0])
    assert torch.equal(torch.from_numpy(adv), a.adversarial) and meta["params"]["steps"] == 2
    with pytest.raises(ValueError, match="is not"):
        load_result(files[0], AttackSpec("pgd", {"steps": 3}))


def test_parse_and_validate():
    specs = parse_attacks("fgsm,pgd:eps=0.05;steps=40,cw:c=2")
    assert [s.name for s in specs] == ["fgsm", "pgd", "cw"]
    assert specs[1].params["eps"] == 0.05 and specs[1].params["steps"] == 40
    assert specs[2].params["c"] == 2
    with pytest.raises(ValueError, match="no parameter"):
        parse_attack("fgsm:steps=3")
    with pytest.raises(ValueError, match="not registered"):
        parse_attack("jsma")
    with pytest.raises(ValueError, match=r"eps=1.5"):
        parse_attack("pgd:eps=1.5")
    with pytest.raises(ValueError, match="twice"):
        parse_attacks("fgsm,fgsm")
