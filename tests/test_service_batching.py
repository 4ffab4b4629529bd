"""Dynamic batching, queue bound, deadlines, concurrency and the /metrics endpoint."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from service_helpers import GatedRunner, config_for, sample, scrape, shared_server, wait_until
from synthetic import make_images

from detector import load_bundle
from detector.screening import ScreenResult
from service.batching import DynamicBatcher
from service.client import PathGuardClient
from service.errors import DeadlineExpired, NotReady, Overloaded
from service.server import BackgroundServer


class FakeRunner:
    """Answers each image with its first pixel as the 'prediction'; batches wait for :meth:`release`."""

    input_shape = (1, 2, 2)

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self._gate = threading.Event()

    def release(self) -> None:
        self._gate.set()

    def screen(self, images: torch.Tensor) -> ScreenResult:
        self.started.set()
        self._gate.wait(10)
        ids = images[:, 0, 0, 0].long().numpy()
        self.batches.append(ids.tolist())
        n = len(ids)
        return ScreenResult(
            predictions=ids,
            probabilities=np.zeros((n, 2), np.float32),
            scores=np.zeros(n),
            flags=np.zeros(n, bool),
            threshold=0.5,
            active_ratio=np.ones(n),
            flops_ratio=np.ones(n),
            paths=np.zeros((n, 3), np.uint8),
            departure=np.zeros((n, 1)),
        )


def images(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


def test_batcher_merges_queued_requests_and_skips_expired_and_cancelled():
    runner = FakeRunner()
    batcher = DynamicBatcher(runner, max_batch_size=8, max_queue_delay=0.0, max_queue_size=16).start()
    try:
        first = batcher.submit(images(1))
        assert runner.started.wait(10)  # the worker is now busy with request 1
        merged = [batcher.submit(images(2, 3)), batcher.submit(images(4, 5, 6))]
        expired = batcher.submit(images(7), deadline=time.monotonic() - 1)
        cancelled = batcher.submit(images(8))
        assert cancelled.cancel()
        too_big = batcher.submit(images(*range(10, 20)))
        runner.release()
        assert first.result(10).predictions.tolist() == [1]
        assert merged[0].result(10).predictions.tolist() == [2, 3]
        assert merged[1].result(10).predictions.tolist() == [4, 5, 6]
        with pytest.raises(DeadlineExpired):
            expired.result(10)
        assert too_big.result(10).predictions.tolist() == list(range(10, 20))
        assert runner.batches == [[1], [2, 3, 4, 5, 6], list(range(10, 20))]
    finally:
        runner.release()
        batcher.stop(10)


def test_a_cancelled_request_takes_no_place_in_the_batch():
    """A caller that cancels while queued between two live requests must not split them into two batches; a queue
    of cancelled requests only leaves the worker ready for the next one."""
    runner = FakeRunner()
    batcher = DynamicBatcher(runner, max_batch_size=4, max_queue_delay=0.0, max_queue_size=16).start()
    try:
        first = batcher.submit(images(1))
        assert runner.started.wait(10)
        live = batcher.submit(images(2, 3))
        gone = batcher.submit(images(4, 5, 6))
        later = batcher.submit(images(7, 8))
        assert gone.cancel()
        runner.release()
        assert first.result(10).predictions.tolist() == [1]
        assert live.result(10).predictions.tolist() == [2, 3] and later.result(10).predictions.tolist() == [7, 8]
        assert runner.batches == [[1], [2, 3, 7, 8]]
    finally:
        runner.release()
        batcher.stop(10)
    runner = FakeRunner()
    batcher = DynamicBatcher(runner, max_batch_size=4, max_queue_delay=0.0, max_queue_size=16).start()
    try:
        first = batcher.submit(images(1))
        assert runner.started.wait(10)
        assert all(batcher.submit(images(i)).cancel() for i in (2, 3))
        runner.release()
        assert first.result(10).predictions.tolist() == [1]
        assert batcher.submit(images(9)).result(10).predictions.tolist() == [9]  # the worker went on
        assert runner.batches == [[1], [9]] and batcher.queued == 0
    finally:
        runner.release()
        batcher.stop(10)


def test_a_lone_caller_is_not_held_for_the_queue_delay():
    runner = FakeRunner()
    runner.release()
    batcher = DynamicBatcher(runner, max_batch_size=32, max_queue_delay=60.0, max_queue_size=4).start()
    try:
        for i in range(3):  # sequential calls: nothing else is queued or on its way, so no waiting
            assert batcher.submit(images(i)).result(timeout=20).predictions.tolist() == [i]
    finally:
        batcher.stop(10)


def test_a_caller_that_sends_again_as_soon_as_it_is_answered_is_not_held():
    """The next request of a sequential caller can arrive before the worker has finished with the batch that
    answered it; the images already answered must not count as load that a forming batch waits for."""
    runner = FakeRunner()
    runner.release()
    batcher = DynamicBatcher(runner, max_batch_size=32, max_queue_delay=60.0, max_queue_size=4).start()
    chained: list = []
    try:
        first = batcher.submit(images(1))
        # runs in the worker thread the moment request 1 is answered, before the worker's own bookkeeping ends
        first.add_done_callback(lambda _: chained.append(batcher.submit(images(2))))
        assert first.result(timeout=20).predictions.tolist() == [1]
        wait_until(lambda: chained, 20)
        assert chained[0].result(timeout=20).predictions.tolist() == [2]  # not held for the 60 s window
        assert runner.batches == [[1], [2]]
    finally:
        batcher.stop(10)


def test_batcher_queue_bound_and_stop():
    runner = FakeRunner()
    batcher = DynamicBatcher(runner, max_batch_size=1, max_queue_delay=0.0, max_queue_size=2).start()
    busy = batcher.submit(images(1))
    assert runner.started.wait(10)
    queued = [batcher.submit(images(2)), batcher.submit(images(3))]
    with pytest.raises(Overloaded):
        batcher.submit(images(4))
    runner.release()
    batcher.stop(10)  # finishes what was accepted
    assert [f.result(0).predictions.tolist() for f in (busy, *queued)] == [[1], [2], [3]]
    with pytest.raises(NotReady):
        batcher.submit(images(5))


def test_queue_full_and_expired_deadline_over_grpc(tiny_bundle):
    x, _ = make_images(3, seed=31)
    with BackgroundServer(config_for(tiny_bundle, max_queue_size=2, max_batch_size=1)) as bg:
        service = bg.server.service
        gated = GatedRunner(service._runtime)
        service.swap(gated)
        with PathGuardClient(bg.target) as client, ThreadPoolExecutor(4) as pool:
            first = pool.submit(client.screen, x[:1])
            assert gated.started.wait(20)
            queued = [pool.submit(client.screen, x[1:2]), pool.submit(client.screen, x[2:3])]
            wait_until(lambda: service.queue_depth == 2)
            with pytest.raises(grpc.RpcError) as full:
                client.screen(x[:1])
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gated.release()
            assert [len(f.result(30)) for f in (first, *queued)] == [1, 1, 1]

            gated = GatedRunner(gated.inner)
            service.swap(gated)
            blocker = pool.submit(client.screen, x[:1])
            assert gated.started.wait(20)
            with pytest.raises(grpc.RpcError) as late:
                client.screen(x[1:3], timeout=0.5)  # waits behind the blocked batch
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            gated.release()
            assert len(blocker.result(30)) == 1
            client.screen(x[:1])
            assert 2 not in gated.batches  # the expired request (2 images) was never computed


def test_many_concurrent_callers_are_all_answered_in_batches(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    x, _ = make_images(48, seed=32)
    expected = load_bundle(tiny_bundle).screen(torch.from_numpy(x)).predictions.tolist()
    before = scrape(server.metrics_url)
    with PathGuardClient(server.target) as client, ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: client.screen(x[i : i + 1])[0].class_index, range(len(x))))
    after = scrape(server.metrics_url)
    assert answers == expected
    batches = sample(after, "pathguard_batch_size_count") - sample(before, "pathguard_batch_size_count")
    singles = sample(after, "pathguard_batch_size_bucket", le="1.0") - sample(
        before, "pathguard_batch_size_bucket", le="1.0"
    )
    assert batches - singles > 0, "no batch held more than one image"
    assert batches < len(x)


def test_metrics_endpoint_counters_and_histograms_move(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    x, _ = make_images(3, seed=33)
    method = "pathguard.v1.PathGuard/ScreenImages"
    before = scrape(server.metrics_url)
    with PathGuardClient(server.target) as client:
        client.screen(x)
        with pytest.raises(grpc.RpcError):
            client.screen(np.full((1, 1, 16, 16), 7.0, np.float32))
    after = scrape(server.metrics_url)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("pathguard_requests_total", method=method, code="OK") == 1
    assert delta("pathguard_requests_total", method=method, code="INVALID_ARGUMENT") == 1
    assert delta("pathguard_request_duration_seconds_count", method=method, code="OK") == 1
    assert delta("pathguard_request_duration_seconds_count", method=method, code="INVALID_ARGUMENT") == 1
    assert delta("pathguard_images_total") == 3
    assert delta("pathguard_queue_duration_seconds_count") == 1
    assert delta("pathguard_batch_size_count") == 1 and delta("pathguard_batch_size_sum") == 3
    assert delta("pathguard_adversarial_score_count") == 3
    assert delta("pathguard_active_filter_ratio_count") == 3
    assert any(k.startswith("pathguard_adversarial_flagged_total{class_name=") for k in after)
    assert sample(after, "pathguard_inflight_requests") == 0
    bundle = load_bundle(tiny_bundle)
    info = [k for k, v in after.items() if k.startswith("pathguard_model_info{") and v == 1]  # the loaded one
    assert info and f'name="{bundle.meta["name"]}"' in info[0] and 'arch="vgg8"' in info[0]
    assert "threshold=" in info[0] and f'version="{bundle.meta["model_version"]}"' in info[0]


def test_queue_is_bounded_in_images_as_well_as_requests():
    runner = FakeRunner()
    batcher = DynamicBatcher(
        runner, max_batch_size=4, max_queue_delay=0.0, max_queue_size=100, max_queue_images=6
    ).start()
    try:
        first = batcher.submit(images(1))
        assert runner.started.wait(10)  # request 1 computes; the queue is empty
        queued = [batcher.submit(images(2, 3, 4)), batcher.submit(images(5, 6))]
        with pytest.raises(Overloaded, match="at most 6 images"):
            batcher.submit(images(7, 8))  # 5 queued + 2 > 6
        queued.append(batcher.submit(images(9)))  # 5 + 1 fits
        runner.release()
        assert [f.result(10).predictions.tolist() for f in (first, *queued)] == [[1], [2, 3, 4], [5, 6], [9]]
    finally:
        runner.release()
        batcher.stop(10)
