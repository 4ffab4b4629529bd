"""bench.bn_recalibration: the re-estimated batch-norm statistics are those of the data it is given."""

import json

import torch

from bench import bn_recalibration
from detector import load_bundle
from detector.bundle import sha256_file
from detector.splits import bundle_splits


def test_statistics_are_re_estimated_on_the_given_images(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    train = bundle_splits(bundle.meta).train
    first_bn = next(m for m in bundle.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    conv = bundle.model.features[0].conv
    bn_recalibration.recalibrate(bundle.model, train, batch_size=len(train), seed=0)
    with torch.no_grad():
        z = conv(bundle.model.normalize(train.float_images(torch.arange(len(train)))))
    torch.testing.assert_close(first_bn.running_mean, z.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert int(first_bn.num_batches_tracked) == 1
    assert not bundle.model.training


def test_the_report_leaves_the_bundles_unchanged(tiny_bundle, tmp_path):
    model_file = tiny_bundle / "model.safetensors"
    digest = sha256_file(model_file)
    out = tmp_path / "bn.json"
    bn_recalibration.main(["--bundles", str(tiny_bundle), "--batch-size", "64", "--json", str(out)])
    row = json.loads(out.read_text())["bundles"][0]
    for split in ("val", "test"):
        assert 0 <= row["before"][split] <= 1 and 0 <= row["after"][split] <= 1
    assert sha256_file(model_file) == digest
