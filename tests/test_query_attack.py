"""The query-only attacker: its loss from what the server reveals, its search, and the same attack run in process
and through the real client against a server on loopback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from service_helpers import config_for

from detector import load_bundle
from detector.adaptive.query import (
    ClientOracle,
    ScreenerOracle,
    SquareQueryAttack,
    p_selection,
    query_loss,
)
from detector.adaptive.query_eval import QueryConfig, union_over_budgets
from detector.disclosure import disclose
from detector.splits import bundle_splits, correctly_classified
from service.client import PathGuardClient
from service.server import BackgroundServer


@pytest.fixture(scope="module")
def parts(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    splits = bundle_splits(bundle.meta)
    idx = correctly_classified(bundle.model, splits.test, 24, seed=0)
    return bundle, bundle.screener(engine="skipping"), splits.test.float_images(idx), splits.test.labels[idx]


def test_loss_is_the_logit_margin_when_exact_and_the_decision_when_not(parts):
    bundle, screener, x, y = parts
    result = screener.screen(x)
    with torch.no_grad():
        logits = bundle.model(x)
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    loss, success = query_loss(disclose(result, "full"), y.numpy(), lam=0.0, kappa=100.0)
    np.testing.assert_allclose(loss, (true - other).numpy(), rtol=1e-3, atol=1e-3)
    assert not success.any()  # correctly classified images: no success yet
    loss, _ = query_loss(disclose(result, "flag"), y.numpy(), lam=2.0, kappa=1.0)
    assert set(loss.tolist()) <= {1.0, 3.0}  # 1[correct] + 2 * 1[flagged]
    np.testing.assert_array_equal(loss == 3.0, result.flags)


def test_square_schedule_shrinks_with_the_budget():
    assert p_selection(0.05, 0, 1000) == 0.05 and p_selection(0.05, 3, 1000) == 0.025
    assert p_selection(0.05, 999, 1000) == 0.05 / 512
    ps = [p_selection(0.05, i, 1000) for i in range(1000)]
    assert all(a >= b for a, b in zip(ps, ps[1:], strict=False))


def test_search_respects_the_ball_and_beats_a_detector_unaware_search(parts):
    _, screener, x, y = parts
    x, y = x[:12], y[:12]
    oracle = ScreenerOracle(screener, "full")
    res = SquareQueryAttack(oracle, eps=0.3, budget=1000, lam=1.0, tau=0.5, init="clean")(x, y, seed=0)
    assert (res.adversarial - x).abs().max() <= 0.3 + 1e-6
    assert res.adversarial.min() >= 0 and res.adversarial.max() <= 1
    assert (res.queries <= 1000).all() and (res.queries >= 1).all()
    # success is what the server says of the returned images
    out = screener.screen(res.adversarial)
    np.testing.assert_array_equal(res.success, (out.predictions != y.numpy()) & ~out.flags)
    assert res.success.mean() >= 0.8
    # the same search blind to the score (lam = 0, plain Square) fools the classifier but gets flagged
    blind = SquareQueryAttack(oracle, eps=0.3, budget=200, lam=0.0, init="stripes")(x, y, seed=0)
    blind_out = screener.screen(blind.adversarial)
    assert (blind_out.predictions != y.numpy()).mean() >= 0.9
    assert blind.success.mean() < res.success.mean()


def test_success_is_the_union_over_smaller_budgets():
    t, f = True, False
    success = {0.1: np.array([f, f, f]), 0.03: np.array([t, f, f]), 0.05: np.array([f, t, f])}
    queries = {0.03: np.array([5, 100, 100]), 0.05: np.array([100, 7, 100]), 0.1: np.array([100, 100, 100])}
    found, spent = union_over_budgets([0.1, 0.03, 0.05], success, queries)
    assert found[0.03].tolist() == [t, f, f] and found[0.05].tolist() == [t, t, f] and found[0.1].tolist() == [t, t, f]
    assert spent[0.1].tolist() == [5, 7, np.inf]


def test_same_attack_in_process_and_through_the_real_client(parts, tiny_bundle):
    """The attacker's view over loopback gRPC is the in-process one: the same seeded search, query for query."""
    _, screener, x, y = parts
    x, y = x[:4], y[:4]
    for policy in ("full", "flag"):
        local = SquareQueryAttack(ScreenerOracle(screener, policy), eps=0.2, budget=12, lam=10)(x, y, seed=3)
        with BackgroundServer(config_for(tiny_bundle, score_policy=policy)) as server:
            with PathGuardClient(server.target) as client:
                oracle = ClientOracle(client, per_call=client.describe().max_images_per_request)
                remote = SquareQueryAttack(oracle, eps=0.2, budget=12, lam=10)(x, y, seed=3)
        assert oracle.calls >= 1
        np.testing.assert_array_equal(remote.success, local.success)
        np.testing.assert_array_equal(remote.queries, local.queries)
        torch.testing.assert_close(remote.adversarial, local.adversarial)


def test_cli_query_only(tiny_bundle, tmp_path):
    from pathguard.main import main

    out = tmp_path / "q"
    argv = ["adaptive", "--bundle", str(tiny_bundle), "--eps", "0.05,0.3", "--out", str(out), "--quiet"]
    argv += ["--query-budget", "30", "--query-n", "8", "--query-only", "--query-policies", "full,flag"]
    assert main(argv) == 0
    r = json.loads((out / "query.json").read_text())
    assert list(r["policies"]) == ["full", "flag"] and r["images"]["n"] == 8
    for per in r["policies"].values():
        assert per["0.05"]["success"] <= per["0.3"]["success"]  # union over budgets
        assert per["0.3"]["success_within"]["30"] == per["0.3"]["success"]
    assert (out / "query.md").is_file() and (out / "query_success.png").is_file()
    assert not (out / "report.json").exists()  # --query-only: no white-box rounds
    with pytest.raises(ValueError, match="query_only needs query_budget"):
        QueryConfig(query_only=True)
