"""Faults that heal: an exception in the model or in result delivery fails exactly that batch's calls with
INTERNAL and a message, and the worker goes on; a stuck worker turns health NOT_SERVING (and `liveness`
past its limit) until it moves again. Faults are injected through the batcher's test hook
(``DynamicBatcher.fault_hook``) into a real server on loopback, called by the real client."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import grpc
import pytest
from service_helpers import config_for, sample, scrape, wait_until
from synthetic import make_images

from service._proto.pathguard.v1 import pathguard_pb2 as pb
from service.client import PathGuardClient
from service.server import LIVENESS_SERVICE, BackgroundServer

X, _ = make_images(3, seed=71)
SERVICE = "pathguard.v1.PathGuard"
SCREEN = f"{SERVICE}/ScreenImages"


class Fault:
    """A fault_hook: at ``stage``, batch number ``at`` (1-based, counting that stage's calls) first waits
    for ``hold`` (if any), then raises ``error`` (if any)."""

    def __init__(self, stage: str, at: int = 1, error: Exception | None = None, hold: threading.Event | None = None):
        self.stage, self.at, self.error, self.hold = stage, at, error, hold
        self.seen = 0
        self.reached = threading.Event()

    def __call__(self, stage: str) -> None:
        if stage != self.stage:
            return
        self.seen += 1
        if self.seen != self.at:
            return
        self.reached.set()
        if self.hold is not None:
            self.hold.wait(60)
        if self.error is not None:
            raise self.error


def request(images) -> pb.ScreenRequest:
    return pb.ScreenRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=list(images.shape), data=images.tobytes()))


def http_status(bg: BackgroundServer, path: str) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}{path}", timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def server(tiny_bundle):
    cfg = config_for(tiny_bundle, watchdog_seconds=0.5, liveness_seconds=1.5, max_queue_delay_ms=0)
    with BackgroundServer(cfg) as bg:
        yield bg


def assert_serving_again(bg: BackgroundServer, client: PathGuardClient) -> None:
    assert bg.server.service.batcher.alive
    wait_until(lambda: client.health() == "SERVING" and client.health(LIVENESS_SERVICE) == "SERVING")
    assert http_status(bg, "/readyz") == 200 and http_status(bg, "/healthz") == 200
    assert len(client.screen(X)) == len(X)


@pytest.mark.parametrize("stage, doing", [("compute", "computing"), ("deliver", "delivering the results of")])
def test_an_exception_fails_exactly_its_batch(server, stage, doing):
    """Batch 1 is held while two more calls queue up behind it; they form batch 2, which fails. Batch 1
    and every later call succeed."""
    batcher = server.server.service.batcher
    release = threading.Event()
    hold = Fault(stage, at=1, hold=release)
    fail = Fault(stage, at=2, error=RuntimeError("injected fault"))

    def hook(s: str) -> None:
        hold(s)
        fail(s)

    batcher.fault_hook = hook
    before = sample(scrape(server.metrics_url), "pathguard_requests_total", method=SCREEN, code="INTERNAL")
    with PathGuardClient(server.target) as client:
        first = client._stub.ScreenImages.future(request(X[:1]), timeout=30)
        assert hold.reached.wait(30)
        queued = [client._stub.ScreenImages.future(request(X[i : i + 1]), timeout=30) for i in (1, 2)]
        wait_until(lambda: batcher.queued == 2)
        release.set()
        assert len(first.result().results) == 1
        for call in queued:
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert f"{doing} the batch this request was part of failed (RuntimeError)" in info.value.details()
        assert fail.seen >= 2
        after = sample(scrape(server.metrics_url), "pathguard_requests_total", method=SCREEN, code="INTERNAL")
        assert after - before == 2
        assert_serving_again(server, client)


def test_a_stuck_worker_turns_health_not_serving_until_it_moves(server):
    release = threading.Event()
    stuck = Fault("compute", at=1, hold=release)
    server.server.service.batcher.fault_hook = stuck
    with PathGuardClient(server.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.screen(X, timeout=1.0)  # its caller gives up; the worker is still stuck on it
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: client.health() == "NOT_SERVING" and client.health(SERVICE) == "NOT_SERVING")
        assert http_status(server, "/readyz") == 503
        wait_until(lambda: client.health(LIVENESS_SERVICE) == "NOT_SERVING")  # past liveness_seconds
        assert http_status(server, "/healthz") == 503
        release.set()
        assert_serving_again(server, client)
