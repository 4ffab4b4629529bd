"""Screening through the real server on loopback: PathGuard's own API and KServe v2 (tritonclient)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from service_helpers import config_for, shared_server
from synthetic import make_images

from detector import load_bundle
from detector.attacks import parse_attack, run_attack
from detector.data import load_dataset
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.client import PathGuardClient
from service.codec import encode_png

TRITON_CHECK = Path(__file__).with_name("service_triton_check.py")


def triton_check(target: str, model: str, images: np.ndarray, tmp_path: Path, *extra: str) -> dict:
    """Run tests/service_triton_check.py (tritonclient.grpc, unmodified) against ``target``."""
    path = tmp_path / "images.npy"
    np.save(path, images.astype(np.float32))
    proc = subprocess.run(
        [sys.executable, str(TRITON_CHECK), "--url", target, "--model", model, "--images", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def clean_and_adversarial(bundle_path: Path, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """``n`` correctly classified test images of the bundle's dataset and their PGD counterparts."""
    bundle = load_bundle(bundle_path)
    cfg = bundle.meta["train_config"]
    data = load_dataset(cfg["dataset"], "test", cfg.get("data_root"))
    x, y = data.float_images(slice(0, 4 * n)), data.labels[: 4 * n]
    correct = bundle.screen(x).predictions == y.numpy()
    x, y = x[torch.from_numpy(correct)][:n], y[torch.from_numpy(correct)][:n]
    adv = run_attack(bundle.model, x, y, parse_attack("pgd"), progress=False).adversarial
    return x.numpy(), adv.numpy()


def test_default_bundle_clean_and_adversarial_through_both_apis(request, default_bundle, tmp_path):
    clean, adv = clean_and_adversarial(default_bundle)
    # Same engine as the server, so that scores near a split of the bundle's tree detector cannot differ.
    engine = config_for(default_bundle).engine
    expected = load_bundle(default_bundle).screener(engine=engine).screen(torch.from_numpy(clean))
    server = shared_server(request, default_bundle)

    with PathGuardClient(server.target) as client:
        own_clean = client.screen(clean)
        own_adv = client.screen(adv)
    assert [r.class_index for r in own_clean] == expected.predictions.tolist()
    np.testing.assert_allclose([r.adversarial_score for r in own_clean], expected.scores, atol=1e-4)
    np.testing.assert_allclose(np.stack([r.probabilities for r in own_clean]), expected.probabilities, atol=1e-4)
    assert np.mean([r.adversarial_score for r in own_adv]) > np.mean([r.adversarial_score for r in own_clean])

    both = np.concatenate([clean, adv])
    expected_both = load_bundle(default_bundle).screener(engine=engine).screen(torch.from_numpy(both))  # one batch
    seen = triton_check(server.target, load_bundle(default_bundle).meta["name"], both, tmp_path)
    scores = np.array(seen["fp32"]["adversarial_score"])
    assert seen["fp32"]["predicted_class"][: len(clean)] == expected.predictions.tolist()
    np.testing.assert_allclose(scores, expected_both.scores, atol=1e-4)
    assert scores[len(clean) :].mean() > scores[: len(clean)].mean()


def test_own_api_options_match_in_process_screening(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    bundle = load_bundle(tiny_bundle)
    x, _ = make_images(6, seed=11)
    expected = bundle.screen(torch.from_numpy(x))
    with PathGuardClient(server.target) as client:
        full = client.screen(x, include_path=True, include_departure=True)
        top = client.screen(x, top_k=2)
        desc = client.describe()
    assert [r.class_index for r in full] == expected.predictions.tolist()
    assert [r.class_name for r in full] == [bundle.classes[i] for i in expected.predictions]
    np.testing.assert_allclose(np.stack([r.probabilities for r in full]), expected.probabilities, atol=1e-4)
    np.testing.assert_array_equal(np.stack([r.path for r in full]), expected.paths)
    np.testing.assert_allclose(np.stack([r.layer_departure for r in full]), expected.departure, atol=1e-5)
    np.testing.assert_allclose([r.active_filter_ratio for r in full], expected.active_ratio, atol=1e-5)
    np.testing.assert_allclose([r.flops_fraction for r in full], expected.flops_ratio, atol=1e-5)
    assert [r.is_adversarial for r in full] == expected.flags.tolist()
    assert all(r.threshold == pytest.approx(expected.threshold) for r in full)
    for r, probs in zip(top, expected.probabilities, strict=True):
        assert r.probabilities is None and len(r.top_classes) == 2
        assert r.top_classes[0].class_index == int(np.argmax(probs))
        assert r.top_classes[0].probability >= r.top_classes[1].probability
    assert desc.name == bundle.meta["name"] and desc.classes == bundle.classes
    assert desc.input_shape == tuple(bundle.input_shape) and desc.path_length == expected.paths.shape[1]
    assert desc.threshold == pytest.approx(expected.threshold)


def test_encoded_png_and_uint8_tensor_give_the_same_answer(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    x, _ = make_images(4, seed=12)
    pixels = np.rint(x * 255).astype(np.uint8)
    with PathGuardClient(server.target) as client:
        from_png = client.screen([encode_png(img) for img in pixels])
        from_uint8 = client.screen(pixels)
        from_float64 = client.screen(pixels.astype(np.float64) / 255)
    for a, b, c in zip(from_png, from_uint8, from_float64, strict=True):
        assert a.class_index == b.class_index == c.class_index
        assert a.adversarial_score == pytest.approx(b.adversarial_score, abs=1e-5)
        assert b.adversarial_score == pytest.approx(c.adversarial_score, abs=1e-5)


def test_stream_answers_in_order_and_reports_per_request_errors(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    x, _ = make_images(12, seed=13)
    batches = [x[i : i + 2] for i in range(0, 12, 2)]
    batches.insert(3, np.zeros((1, 1, 8, 8), np.float32))
    with PathGuardClient(server.target) as client:
        items = list(client.screen_stream(batches))
        single = client.screen(x)
    assert [i.request_id for i in items] == [str(i) for i in range(len(batches))]
    assert items[3].error is not None and items[3].error.code == "INVALID_ARGUMENT" and not items[3].results
    streamed = [r.class_index for i in items if i.error is None for r in i.results]
    assert streamed == [r.class_index for r in single]


def test_kserve_with_tritonclient(request, tiny_bundle, tmp_path):
    server = shared_server(request, tiny_bundle)
    bundle = load_bundle(tiny_bundle)
    x, _ = make_images(5, seed=14)
    expected = bundle.screen(torch.from_numpy(x))
    seen = triton_check(server.target, bundle.meta["name"], x, tmp_path)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["metadata"]["name"] == bundle.meta["name"]
    assert seen["metadata"]["versions"] == [bundle.meta["model_version"]]
    # one entry per accepted datatype, the model's own FP32 first
    assert seen["metadata"]["inputs"] == [["images", dt, [-1, *bundle.input_shape]] for dt in ("FP32", "FP64", "UINT8")]
    outputs = seen["metadata"]["outputs"]
    assert outputs["probabilities"] == ["FP32", [-1, len(bundle.classes)]]
    assert outputs["predicted_class"] == ["INT64", [-1]] and outputs["is_adversarial"] == ["BOOL", [-1]]
    assert outputs["adversarial_score"] == ["FP32", [-1]]
    fp32 = seen["fp32"]
    assert fp32["id"] == "fp32-1"
    assert fp32["predicted_class"] == expected.predictions.tolist()
    np.testing.assert_allclose(fp32["probabilities"], expected.probabilities, atol=1e-4)
    np.testing.assert_allclose(fp32["adversarial_score"], expected.scores, atol=1e-4)
    assert fp32["is_adversarial"] == expected.flags.tolist()
    assert fp32["dtypes"] == {
        "predicted_class": "int64",
        "probabilities": "float32",
        "adversarial_score": "float32",
        "is_adversarial": "bool",
    }
    assert seen["uint8"]["outputs"] == ["predicted_class", "adversarial_score"]
    assert seen["uint8"]["predicted_class"] == expected.predictions.tolist()
    assert seen["unknown_model"] == "StatusCode.NOT_FOUND"


def test_kserve_typed_contents(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    bundle = load_bundle(tiny_bundle)
    x, _ = make_images(3, seed=15)
    expected = bundle.screen(torch.from_numpy(x))
    req = kserve_pb2.ModelInferRequest(model_name=bundle.meta["name"], model_version=bundle.meta["model_version"])
    tensor = req.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    req.outputs.add(name="predicted_class")
    with grpc.insecure_channel(server.target) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(req, timeout=30)
        assert stub.ServerReady(kserve_pb2.ServerReadyRequest(), timeout=10).ready
    assert [o.name for o in response.outputs] == ["predicted_class"]
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == expected.predictions.tolist()
