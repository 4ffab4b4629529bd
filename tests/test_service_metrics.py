"""The operator metrics: each is on the real /metrics endpoint and moves when its event happens."""

from __future__ import annotations

import gc

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram
from service_helpers import sample, scrape, shared_server
from synthetic import make_images

from service import metrics
from service.client import PathGuardClient

METHOD = "pathguard.v1.PathGuard/ScreenImages"


def _family(scraped: dict[str, float], name: str) -> dict[str, float]:
    return {k: v for k, v in scraped.items() if k.startswith(name + "{")}


def test_observe_many_equals_one_observe_per_value():
    bounds = (-0.5, -0.01, 0.0, 0.01, 0.5)
    values = np.array([-1.0, -0.5, -0.02, -0.01, 0.0, 0.0, 0.005, 0.01, 0.3, 0.5, 0.7, 2.0])
    one, many = CollectorRegistry(), CollectorRegistry()
    h_one = Histogram("h", "one by one", buckets=bounds, registry=one)
    h_many = Histogram("h", "in one pass", buckets=bounds, registry=many)
    for v in values:
        h_one.observe(float(v))
    metrics.observe_many(h_many, values)

    def samples(registry):
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(one) == pytest.approx(samples(many))


def test_every_operator_metric_moves_and_per_class_counters_add_up(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    x, _ = make_images(24, seed=61)
    before = scrape(server.metrics_url)
    with PathGuardClient(server.target) as client:
        results = client.screen(x[:16]) + client.screen(x[16:])
        with pytest.raises(grpc.RpcError):
            client.screen(np.full((1, 1, 16, 16), 7.0, np.float32))  # INVALID_ARGUMENT
    gc.collect()  # the server runs in this process: its GC counters must move
    after = scrape(server.metrics_url)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    n = len(results)
    assert delta("pathguard_images_total") == n
    # per-class predictions add up to the images screened, and match the answers class by class
    predicted = {k: v - before.get(k, 0) for k, v in _family(after, "pathguard_predictions_total").items()}
    assert sum(predicted.values()) == n
    for name in {r.class_name for r in results}:
        assert predicted[f'pathguard_predictions_total{{class_name="{name}"}}'] == sum(
            r.class_name == name for r in results
        )
    flagged = {k: v - before.get(k, 0) for k, v in _family(after, "pathguard_adversarial_flagged_total").items()}
    assert sum(flagged.values()) == sum(r.is_adversarial for r in results)
    assert len(flagged) == len(predicted)  # every class has both series, zero or not
    # threshold gauge and score - threshold histogram
    threshold = results[0].threshold
    assert sample(after, "pathguard_adversarial_threshold") == pytest.approx(threshold)
    assert delta("pathguard_adversarial_score_margin_count") == n
    # (no _sum: prometheus-client leaves it out of a histogram with negative buckets)
    near = sum(abs(r.adversarial_score - threshold) <= 0.05 for r in results)
    assert (
        delta("pathguard_adversarial_score_margin_bucket", le="0.05")
        - delta("pathguard_adversarial_score_margin_bucket", le="-0.05")
        == near
    )
    above = n - (
        sample(after, "pathguard_adversarial_score_margin_bucket", le="0.0")
        - sample(before, "pathguard_adversarial_score_margin_bucket", le="0.0")
    )
    assert above == sum(r.is_adversarial for r in results)
    # model compute time per batch; request duration by code, with fine buckets between 5 and 300 ms
    assert delta("pathguard_model_compute_duration_seconds_count") == delta("pathguard_batch_size_count") >= 2
    assert delta("pathguard_request_duration_seconds_count", method=METHOD, code="OK") == 2
    assert delta("pathguard_request_duration_seconds_count", method=METHOD, code="INVALID_ARGUMENT") == 1
    buckets = [
        float(k.split('le="')[1].split('"')[0])
        for k in after
        if k.startswith("pathguard_request_duration_seconds_bucket{")
        and f'method="{METHOD}"' in k
        and 'code="OK"' in k
        and "+Inf" not in k
    ]
    assert sum(0.005 <= b <= 0.3 for b in buckets) >= 15
    # GC and platform collectors, process collector
    assert sum(_family(after, "python_gc_collections_total").values()) > sum(
        _family(before, "python_gc_collections_total").values()
    )
    assert any(k.startswith("python_info{") for k in after)
    assert sample(after, "process_resident_memory_bytes") > 0


def test_reload_count_and_time(request, tiny_bundle, tmp_path):
    server = shared_server(request, tiny_bundle)
    before = scrape(server.metrics_url)
    assert server.reload(str(tiny_bundle)) is not None
    assert server.reload(str(tmp_path / "no-such-bundle")) is None  # refused: the old model keeps serving
    after = scrape(server.metrics_url)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("pathguard_reloads_total", result="success") == 1
    assert delta("pathguard_reloads_total", result="failure") == 1
    assert delta("pathguard_reload_duration_seconds_count") == 1
    assert delta("pathguard_reload_duration_seconds_sum") > 0
    assert sample(after, "pathguard_last_reload_timestamp_seconds") > 0
    with PathGuardClient(server.target) as client:
        assert client.health() == "SERVING"
