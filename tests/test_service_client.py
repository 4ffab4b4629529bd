"""The Python client and `pathguard screen` against a real server: lists of arrays, files grouped per call,
a bad file marked while the run goes on, and decoding off the server's event loop."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from service_helpers import config_for, sample, scrape, shared_server
from synthetic import make_images

from pathguard.main import main
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.client import DEFAULT_STREAM_TIMEOUT, PathGuardClient
from service.codec import encode_png
from service.server import BackgroundServer

SCREEN = "pathguard.v1.PathGuard/ScreenImages"
X, _ = make_images(5, seed=91)


def screen_calls(server) -> float:
    return sample(scrape(server.metrics_url), "pathguard_requests_total", method=SCREEN, code="OK")


def test_a_list_of_arrays_is_one_tensor_request(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    with PathGuardClient(server.target) as client:
        whole = client.screen(X)
        listed = client.screen([X[0], X[1:3], X[3], X[4]])  # (C,H,W) images and (N,C,H,W) batches mixed
        assert [r.class_index for r in listed] == [r.class_index for r in whole]
        assert np.allclose([r.adversarial_score for r in listed], [r.adversarial_score for r in whole], atol=1e-5)
        with pytest.raises(ValueError, match="one shape and dtype"):
            client.screen([X[0], X[1].astype(np.float64)])
        with pytest.raises(ValueError, match="not a mix"):
            client.screen([X[0], b"\x89PNG"])
        assert client.stream_timeout == DEFAULT_STREAM_TIMEOUT  # streams have a default deadline too


def test_screen_groups_files_per_call_and_marks_a_bad_one(request, tiny_bundle, tmp_path, capsys):
    server = shared_server(request, tiny_bundle)
    paths = []
    for i, x in enumerate(X):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(encode_png(x))
        paths.append(str(path))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    missing = str(tmp_path / "missing.png")
    before = screen_calls(server)
    assert main(["screen", "--target", server.target, "--json", *paths]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == paths
    assert screen_calls(server) - before == 1  # five files, one call (the server takes up to 64)

    files = [paths[0], str(broken), paths[1], missing, paths[2]]
    assert main(["screen", "--target", server.target, "--json", "--batch", "2", *files]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == files  # every file has its row, in order
    assert "error" in rows[1] and rows[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert rows[3]["error"]["code"] == "FILE" and "no such file" in rows[3]["error"]["message"]
    assert all("class_name" in rows[i] for i in (0, 2, 4))


def test_encoded_images_are_decoded_off_the_event_loop(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    service = server.server.service
    seen: list[str] = []
    original = service.images_from_encoded

    def spy(files):
        seen.append(threading.current_thread().name)
        return original(files)

    service.images_from_encoded = spy
    try:
        with PathGuardClient(server.target) as client:
            assert len(client.screen([encode_png(x) for x in X])) == len(X)
    finally:
        del service.images_from_encoded
    assert len(seen) == 1 and seen[0].startswith("pathguard-decode"), seen


def test_model_name_overrides_the_bundles_name(tiny_bundle):
    """--model-name (KServe passes the InferenceService's name): the model is served and described under it."""
    with (
        BackgroundServer(config_for(tiny_bundle, model_name="fraud-screen")) as bg,
        PathGuardClient(bg.target) as client,
    ):
        assert client.describe().name == "fraud-screen"
        stub = kserve_grpc.GRPCInferenceServiceStub(client._channel)
        assert stub.ModelReady(kserve_pb2.ModelReadyRequest(name="fraud-screen"), timeout=10).ready
        assert (
            stub.ModelMetadata(kserve_pb2.ModelMetadataRequest(name="fraud-screen"), timeout=10).name == "fraud-screen"
        )
