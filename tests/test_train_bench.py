"""bench.train_bench: the timed configs start from a bundle's own training recipe when asked."""

import json

import pytest

from bench import train_bench
from detector.bundle import BundleError, read_meta


def test_config_from_a_bundle_times_that_bundles_recipe(tiny_bundle, tmp_path):
    out = tmp_path / "epoch_time.json"
    train_bench.main(["--images", "64", "--repeats", "1", "--config-from", str(tiny_bundle), "--out", str(out)])
    r = json.loads(out.read_text())
    recorded = read_meta(tiny_bundle)["train_config"]
    differing = {k for k, v in r["config"].items() if recorded.get(k, v) != v}
    assert differing <= {"threads"}, differing
    assert r["config_from"] == str(tiny_bundle) and set(r["seconds"]) == {"dense", "gated"}


def test_config_from_a_folder_without_a_bundle_is_refused(tmp_path):
    with pytest.raises(BundleError, match="bundle.json not found"):
        train_bench.main(["--images", "8", "--repeats", "1", "--config-from", str(tmp_path)])
