"""The score policy (full, rounded, flag): what the server reveals, on the own API, streaming and KServe v2."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch
from service_helpers import config_for
from synthetic import make_images
from test_service_api import triton_check

from detector import load_bundle
from detector.disclosure import ROUND_STEP, disclose, round_scores, round_to
from pathguard.main import build_parser, main
from pathguard.options import config_from
from service.client import PathGuardClient
from service.config import ServeConfig
from service.server import BackgroundServer


def test_rounded_scores_keep_the_flag_and_reveal_only_the_bin():
    rng = np.random.default_rng(0)
    t = 0.7919992140756023
    s = np.concatenate([rng.uniform(0, 1, 2000), [t, np.nextafter(t, 1), np.nextafter(t, 0), 0.0, 1.0]])
    r = round_scores(s, t)
    assert ((r > t) == (s > t)).all()  # the flag a caller infers is the server's flag
    k = (r - t) / ROUND_STEP
    inside = (r > 0) & (r < 1)  # away from the clipped ends every value is on the grid t + k * step
    assert np.allclose(k[inside], np.round(k[inside]))
    assert (np.abs(r - s)[inside] < ROUND_STEP + 1e-12).all()
    # two scores in one bin look the same
    assert round_scores(np.array([t + 0.011]), t) == round_scores(np.array([t + 0.049]), t)
    p = np.array([[0.012, 0.26, 0.728]], np.float32)
    assert np.allclose(round_to(p), [[0.0, 0.25, 0.75]]) and round_to(p).dtype == np.float32


def test_disclose_withholds_what_the_policy_hides(tiny_bundle):
    x, _ = make_images(6, seed=21)
    result = load_bundle(tiny_bundle).screen(torch.from_numpy(x))
    full = disclose(result, "full")
    assert full.scores is result.scores and full.paths is result.paths
    rounded = disclose(result, "rounded")
    assert rounded.paths is None and rounded.departure is None
    assert np.array_equal(rounded.flags, result.flags) and np.array_equal(rounded.predictions, result.predictions)
    assert np.abs(rounded.probabilities - result.probabilities).max() <= ROUND_STEP / 2 + 1e-6
    flag = disclose(result, "flag")
    hidden = ("probabilities", "scores", "threshold", "active_ratio", "flops_ratio", "paths", "departure")
    assert all(getattr(flag, name) is None for name in hidden)
    assert np.array_equal(flag.flags, result.flags)
    with pytest.raises(ValueError, match="score_policy='exact'"):
        disclose(result, "exact")


def test_flag_and_environment():
    args = build_parser().parse_args(["serve", "--score-policy", "flag"])
    assert config_from(ServeConfig, args, {}).score_policy == "flag"
    assert config_from(ServeConfig, None, {"PATHGUARD_SCORE_POLICY": "rounded"}).score_policy == "rounded"
    assert config_from(ServeConfig, None, {}).score_policy == "full"
    with pytest.raises(ValueError, match="score_policy='coarse'"):
        config_from(ServeConfig, None, {"PATHGUARD_SCORE_POLICY": "coarse"})


@pytest.mark.parametrize("policy", ["rounded", "flag"])
def test_policy_on_own_api_stream_and_kserve(tiny_bundle, tmp_path, capsys, policy):
    bundle = load_bundle(tiny_bundle)
    x, _ = make_images(8, seed=22)
    expected = disclose(bundle.screener(engine="skipping").screen(torch.from_numpy(x)), policy)
    with BackgroundServer(config_for(tiny_bundle, score_policy=policy)) as server:
        with PathGuardClient(server.target) as client:
            assert client.describe().score_policy == policy
            unary = client.screen(x)
            streamed = [r for item in client.screen_stream([x[:3], x[3:]]) for r in item.results]
            for results in (unary, streamed):
                assert [r.score_policy for r in results] == [policy] * len(x)
                assert [r.class_index for r in results] == expected.predictions.tolist()
                assert [r.is_adversarial for r in results] == expected.flags.tolist()
                if policy == "flag":
                    assert all(r.adversarial_score is None and r.threshold is None for r in results)
                    assert all(r.probabilities is None and r.active_filter_ratio is None for r in results)
                else:
                    np.testing.assert_allclose([r.adversarial_score for r in results], expected.scores, atol=1e-6)
                    np.testing.assert_allclose([r.probabilities for r in results], expected.probabilities, atol=1e-6)
                    assert all((r.adversarial_score > r.threshold) == r.is_adversarial for r in results)
            # extras the policy withholds are refused, unary and per request in a stream
            with pytest.raises(grpc.RpcError) as err:
                client.screen(x[:1], include_path=True)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and policy in err.value.details()
            item = next(client.screen_stream([x[:1]], include_departure=True))
            assert item.error is not None and item.error.code == "INVALID_ARGUMENT" and not item.results
            if policy == "flag":
                with pytest.raises(grpc.RpcError, match="top_k"):
                    client.screen(x[:1], top_k=2)
        seen = triton_check(server.target, bundle.meta["name"], x, tmp_path, "--policy")
        np.save(tmp_path / "two.npy", x[:2])
        capsys.readouterr()
        assert main(["screen", "--target", server.target, "--json", str(tmp_path / "two.npy")]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert main(["screen", "--target", server.target, str(tmp_path / "two.npy")]) == 0
        table = capsys.readouterr().out
    assert seen["parameters"]["score_policy"] == policy
    assert seen["outputs"]["predicted_class"] == expected.predictions.tolist()
    assert seen["outputs"]["is_adversarial"] == expected.flags.tolist()
    assert [r["score_policy"] for r in rows] == [policy] * 2
    if policy == "flag":
        assert all(r["adversarial_score"] is None and r["confidence"] is None for r in rows)
        assert "reveals only the class and the flag" in table
    else:
        assert [r["adversarial_score"] for r in rows] == pytest.approx(expected.scores[:2].tolist(), abs=1e-6)
        assert "adversarial when score > threshold" in table
    if policy == "flag":
        assert sorted(seen["metadata_outputs"]) == sorted(seen["outputs"]) == ["is_adversarial", "predicted_class"]
        assert "adversarial_threshold" not in seen["parameters"]
        assert seen["asked_for_score"].startswith("StatusCode.INVALID_ARGUMENT") and "flag" in seen["asked_for_score"]
    else:
        assert set(seen["outputs"]) == set(seen["metadata_outputs"]) and "adversarial_score" in seen["outputs"]
        np.testing.assert_allclose(seen["outputs"]["adversarial_score"], expected.scores, atol=1e-6)
        np.testing.assert_allclose(seen["outputs"]["probabilities"], expected.probabilities, atol=1e-6)
        assert seen["asked_for_score"] == "OK"
