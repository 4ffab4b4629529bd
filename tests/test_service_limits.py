"""Limits that keep a server healthy under pressure: the receive limit derived from the model, resident
memory under a flood of maximal requests, connection age (clients reconnect and re-resolve) and keepalive
enforcement. The flood runs against ``pathguard serve`` in a subprocess (its memory alone is measured)."""

from __future__ import annotations

import io
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from service_helpers import THREADS, config_for, wait_until
from synthetic import make_images

from detector import load_bundle
from service._proto.pathguard.v1 import pathguard_pb2 as pb
from service._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc
from service.client import PathGuardClient
from service.config import ServeConfig
from service.server import BackgroundServer, request_memory_bound

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from load import ServerProcess, rss_bytes  # noqa: E402

BUDGET_MB = 48  # memory budget of the requests in flight (~10 maximal requests of the tiny bundle)
FLOOD_CALLERS = 64  # far more maximal requests at once than the budget takes
CALLS_EACH = 3
# Beyond the bound: the allocator's and gRPC's own buffers, thread stacks, the interpreter's caches.
SLACK = 64 << 20


def padded_png(image: np.ndarray, size: int) -> bytes:
    """A valid PNG of ``image`` (H, W) uint8 grown to exactly ``size`` bytes with a text chunk."""
    def png(text: str) -> bytes:
        info = PngImagePlugin.PngInfo()
        info.add_text("pad", text)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()
    base = len(png("x"))
    out = png("x" * (size - base + 1))
    assert len(out) == size
    return out


def maximal_request(shape: tuple[int, int, int], receive_limit: int, max_images: int, seed: int = 0) -> bytes:
    """A valid own-API request of ``max_images`` PNG files just under ``receive_limit`` bytes."""
    rng = np.random.default_rng(seed)
    per_file = (receive_limit - 4096) // max_images - 8  # 8: each file's field tag and length
    files = [padded_png(rng.integers(0, 256, shape[1:], dtype=np.uint8), per_file) for _ in range(max_images)]
    data = pb.ScreenRequest(encoded=pb.EncodedImages(images=files)).SerializeToString()
    assert receive_limit - 8192 < len(data) <= receive_limit
    return data


def test_receive_limit_is_derived_from_the_model(tiny_bundle):
    shape = tuple(load_bundle(tiny_bundle).input_shape)
    cfg = config_for(tiny_bundle)
    limit = cfg.receive_limit(shape)
    c, h, w = shape
    assert limit == cfg.max_images_per_request * (c * h * w * 8 + (16 << 10)) + (64 << 10) < (16 << 20)
    assert ServeConfig(max_message_mb=3).receive_limit(shape) == 3 << 20  # an explicit limit wins
    with BackgroundServer(cfg) as bg, grpc.insecure_channel(bg.target, options=[
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        assert bg.server.receive_limit == limit
        call = channel.unary_unary("/pathguard.v1.PathGuard/ScreenImages",
                                   response_deserializer=pb.ScreenResponse.FromString)
        biggest = maximal_request(shape, limit, cfg.max_images_per_request)
        assert len(call(biggest, timeout=60).results) == cfg.max_images_per_request
        over = pb.ScreenRequest(encoded=pb.EncodedImages(images=[b"\0" * limit])).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            call(over, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # every call's open-call ticket and budget charge are given back once it ended
        interceptor = bg.server._interceptor
        wait_until(lambda: interceptor.open_calls == 0 and interceptor.budget.used == 0)


def test_flood_of_maximal_requests_stays_within_the_memory_bound(tiny_bundle):
    """Far more callers than the budget takes, each sending requests of the largest size the server accepts:
    resident memory stays within request_memory_bound() (+ slack) above the idle server's, and no call
    is INTERNAL (the excess gets RESOURCE_EXHAUSTED)."""
    shape = tuple(load_bundle(tiny_bundle).input_shape)
    cfg = ServeConfig(max_request_memory_mb=BUDGET_MB)
    bound = request_memory_bound(cfg, shape)
    server = ServerProcess(tiny_bundle, threads=THREADS, args=["--max-request-memory-mb", str(BUDGET_MB)])
    try:
        payload = maximal_request(shape, cfg.receive_limit(shape), cfg.max_images_per_request)
        with grpc.insecure_channel(server.target) as channel:
            call = channel.unary_unary("/pathguard.v1.PathGuard/ScreenImages",
                                       response_deserializer=pb.ScreenResponse.FromString)
            assert len(call(payload, timeout=60).results) == cfg.max_images_per_request  # warm
            idle = rss_bytes(server.pid)
            peak, done = [idle], threading.Event()

            def watch() -> None:
                while not done.is_set():
                    peak.append(rss_bytes(server.pid) or 0)
                    time.sleep(0.02)

            codes: Counter[str] = Counter()
            lock = threading.Lock()

            def caller() -> None:
                for _ in range(CALLS_EACH):
                    try:
                        call(payload, timeout=120)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    with lock:
                        codes[code] += 1

            watcher = threading.Thread(target=watch)
            watcher.start()
            callers = [threading.Thread(target=caller) for _ in range(FLOOD_CALLERS)]
            for t in callers:
                t.start()
            for t in callers:
                t.join(600)
            done.set()
            watcher.join(10)
        growth = max(peak) - idle
        print(f"flood: {dict(codes)}; idle RSS {idle / 2**20:.0f} MiB, peak {max(peak) / 2**20:.0f} MiB "
              f"(+{growth / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB + slack {SLACK >> 20} MiB)")
        assert sum(codes.values()) == FLOOD_CALLERS * CALLS_EACH
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] > 0, codes
        assert growth <= bound + SLACK
        assert server.proc.poll() is None
    finally:
        server.kill()


def test_connections_are_aged_so_clients_reconnect(tiny_bundle):
    """With a maximum connection age the server sends GOAWAY; the client reconnects (re-resolving the name,
    which is how new pods behind a headless Service get traffic) and no call fails."""
    cfg = config_for(tiny_bundle, max_connection_age=0.5, max_connection_age_grace=10)
    x, _ = make_images(1, seed=81)
    with BackgroundServer(cfg) as bg, PathGuardClient(bg.target) as client:
        states: list[grpc.ChannelConnectivity] = []
        client._channel.subscribe(states.append)
        end = time.monotonic() + 3.0
        calls = 0
        while time.monotonic() < end:
            assert len(client.screen(x)) == 1
            calls += 1
        connects = sum(1 for s in states if s is grpc.ChannelConnectivity.READY)
        assert calls > 0 and connects >= 2, states


def test_a_client_pinging_too_often_is_disconnected(tiny_bundle):
    """Keepalive enforcement: pings faster than keepalive_min_interval end the connection (GOAWAY
    too_many_pings); a well-behaved client on another connection is unaffected."""
    with BackgroundServer(config_for(tiny_bundle, keepalive_min_interval=10)) as bg:
        options = [("grpc.keepalive_time_ms", 100), ("grpc.keepalive_timeout_ms", 1000),
                   ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)]
        with grpc.insecure_channel(bg.target, options=options) as channel:
            def idle():  # a stream that stays open without sending, while the client pings
                time.sleep(15)
                yield from ()
            stream = pb_grpc.PathGuardStub(channel).ScreenStream(idle(), timeout=20)
            with pytest.raises(grpc.RpcError) as info:
                next(stream)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "too many pings" in info.value.details().lower(), info.value.details()
        x, _ = make_images(1, seed=82)
        with PathGuardClient(bg.target) as polite:
            assert len(polite.screen(x)) == 1
