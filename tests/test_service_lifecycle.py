"""Process lifecycle: `pathguard serve` drains on SIGTERM and exits 0; health; bundle reload."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import THREADS, config_for, permuted_bundle, sample, scrape, wait_until
from synthetic import make_images

from bench.helpers import ServerProcess
from service.client import PathGuardClient
from service.server import BackgroundServer


def test_sigterm_finishes_accepted_calls_refuses_new_ones_and_exits_0(tiny_bundle):
    server = ServerProcess(tiny_bundle, THREADS, ["--max-batch-size", "1", "--grace-period", "60"])
    try:
        x, _ = make_images(64, seed=41)
        metrics_url = server.metrics_url
        with PathGuardClient(server.target, timeout=120) as client, ThreadPoolExecutor(12) as pool:
            assert client.health() == "SERVING"
            # Each request (64 images) runs as 64 batches of one, so the 12 requests make a queue to drain.
            calls = [pool.submit(client.screen, x) for _ in range(12)]
            pending_at_signal = []

            def all_accepted_some_pending() -> bool:
                # every call is in flight or already answered, and some are still in flight
                inflight = sample(scrape(metrics_url), "pathguard_inflight_requests")
                pending_at_signal[:] = [inflight]
                return inflight > 0 and inflight + sum(call.done() for call in calls) >= len(calls)

            wait_until(all_accepted_some_pending, 60)
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: any("draining" in line for line in server.lines), 30)
            with PathGuardClient(server.target, timeout=10) as late:
                try:
                    late.screen(x[:1])
                    refused = None
                except grpc.RpcError as exc:
                    refused = exc.code()
            answers = [len(call.result(120)) for call in calls]
        assert pending_at_signal[0] > 0
        assert refused == grpc.StatusCode.UNAVAILABLE
        assert answers == [len(x)] * len(calls)
        assert server.proc.wait(60) == 0, "".join(server.lines)
        log = "".join(server.lines)
        assert "received SIGTERM" in log and "stopped" in log
    finally:
        server.kill()


def test_health_and_reflection_list_every_service_and_health_goes_not_serving(tiny_bundle):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    bg = BackgroundServer(config_for(tiny_bundle)).start()
    channel = grpc.insecure_channel(bg.target)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"pathguard.v1.PathGuard", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        for service in ("", "pathguard.v1.PathGuard", "inference.GRPCInferenceService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        # enter_graceful_shutdown flips every service to NOT_SERVING before the port closes
        bg._call(bg.server.health.enter_graceful_shutdown())
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        channel.close()
        bg.stop()


def test_reload_swaps_the_bundle_and_a_broken_one_is_refused(tiny_bundle, tmp_path):
    """Reload to another bundle (model version 2, classifier rows rotated): answers come from it; a broken
    bundle is refused and version 2 keeps serving."""
    x, _ = make_images(4, seed=42)
    other = permuted_bundle(tiny_bundle, tmp_path / "v2")
    with BackgroundServer(config_for(tiny_bundle)) as bg, PathGuardClient(bg.target) as client:
        before = client.screen(x)
        assert client.describe().version == "1"
        assert bg.reload(str(other)) is not None
        assert client.describe().version == "2"
        swapped = client.screen(x)
        assert bg.reload(str(tmp_path / "missing")) is None  # logged; the loaded model keeps serving
        after = client.screen(x)
        assert client.health() == "SERVING" and client.describe().version == "2"
    # the same images get the same class names from the rotated model, but other class indices
    assert [r.class_name for r in swapped] == [r.class_name for r in before]
    assert [r.class_index for r in swapped] != [r.class_index for r in before]
    assert [(r.class_index, r.class_name) for r in after] == [(r.class_index, r.class_name) for r in swapped]


def test_sighup_rereads_the_token_file_of_a_running_server(tiny_bundle, tmp_path):
    """`pathguard serve` itself: SIGHUP re-reads the token file (old + new during a rotation, then new only)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("first\n")
    server = ServerProcess(tiny_bundle, threads=THREADS, args=["--auth-token-file", str(tokens)])
    try:
        x, _ = make_images(1, seed=42)
        first = PathGuardClient(server.target, token="first", insecure_token=True)
        second = PathGuardClient(server.target, token="second", insecure_token=True)
        assert len(first.screen(x)) == 1

        def rotate(text: str) -> None:
            tokens.write_text(text)
            seen = len(server.lines)
            server.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: server.find("credentials re-read", after=seen) is not None, 30)

        rotate("first\nsecond\n")
        assert len(first.screen(x)) == 1 and len(second.screen(x)) == 1
        rotate("second\n")
        assert len(second.screen(x)) == 1
        with pytest.raises(grpc.RpcError) as info:
            first.screen(x)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        first.close()
        second.close()
    finally:
        server.kill()
