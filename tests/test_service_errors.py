"""Bad input gets the exact status code and a precise message, and the server keeps serving."""

from __future__ import annotations

import io
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image
from service_helpers import shared_server
from synthetic import make_images

from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service._proto.pathguard.v1 import pathguard_pb2 as pb
from service._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc
from service.client import PathGuardClient, build_request
from service.codec import encode_png

INVALID = grpc.StatusCode.INVALID_ARGUMENT
GOOD, _ = make_images(2, seed=21)


def tensor_request(array: np.ndarray, dtype=pb.FLOAT32, shape=None, data: bytes | None = None) -> pb.ScreenRequest:
    return pb.ScreenRequest(
        tensor=pb.Tensor(
            dtype=dtype,
            shape=list(array.shape if shape is None else shape),
            data=array.tobytes() if data is None else data,
        )
    )


def png_bomb(width: int = 200_000, height: int = 200_000) -> bytes:
    """A tiny PNG whose header claims a huge grayscale canvas."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def truncated_png() -> bytes:
    data = encode_png(GOOD[0])
    return data[: len(data) // 2]


def jpeg(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 100).save(buf, format="JPEG")
    return buf.getvalue()


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16, 16), 100).save(buf, format="GIF")
    return buf.getvalue()


def kserve(
    datatype="FP32",
    shape=(1, 1, 16, 16),
    raw: bytes | None = None,
    *,
    model="pathguard",
    version="",
    name="images",
    outputs=(),
    typed=None,
) -> kserve_pb2.ModelInferRequest:
    req = kserve_pb2.ModelInferRequest(model_name=model, model_version=version)
    tensor = req.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if typed is not None:
        tensor.contents.fp32_contents.extend(typed)
    if raw is not None:
        req.raw_input_contents.append(raw)
    for o in outputs:
        req.outputs.add(name=o)
    return req


NAN = GOOD.copy()
NAN[0, 0, 3, 3] = np.nan
INF = GOOD.copy()
INF[1, 0, 0, 0] = np.inf
ONE_IMAGE = GOOD[:1].tobytes()

# (id, API, request, expected code, words the message must contain)
OWN_CASES = [
    ("empty-request", pb.ScreenRequest(), INVALID, "empty request"),
    ("no-encoded-images", pb.ScreenRequest(encoded=pb.EncodedImages()), INVALID, "no images"),
    ("wrong-shape", tensor_request(np.zeros((1, 1, 8, 8), np.float32)), INVALID, "(1, 16, 16)"),
    ("wrong-rank", tensor_request(np.zeros((16, 16), np.float32)), INVALID, "(N, C, H, W)"),
    ("zero-images", tensor_request(np.zeros((0, 1, 16, 16), np.float32)), INVALID, "no images"),
    ("dtype-unspecified", tensor_request(GOOD, dtype=pb.DATA_TYPE_UNSPECIFIED), INVALID, "DATA_TYPE_UNSPECIFIED"),
    ("dtype-unknown-number", tensor_request(GOOD, dtype=42), INVALID, "42"),
    ("byte-count-short", tensor_request(GOOD, data=GOOD.tobytes()[:-4]), INVALID, "bytes"),
    ("byte-count-dtype-mismatch", tensor_request(GOOD, dtype=pb.FLOAT64), INVALID, "bytes"),
    ("nan", tensor_request(NAN), INVALID, "NaN"),
    ("inf", tensor_request(INF), INVALID, "infinite"),
    ("above-one", tensor_request(GOOD + 1.0), INVALID, "[0, 1]"),
    ("below-zero", tensor_request(GOOD - 1.0), INVALID, "[0, 1]"),
    ("too-many-images", tensor_request(np.zeros((65, 1, 16, 16), np.float32)), INVALID, "limit of 64"),
    ("huge-claimed-count", tensor_request(GOOD, shape=[10**12, 1, 16, 16]), INVALID, "limit of 64"),
    ("negative-dim", tensor_request(GOOD, shape=[-1, 1, 16, 16]), INVALID, "negative"),
    ("garbage-png", pb.ScreenRequest(encoded=pb.EncodedImages(images=[b"\x89PNG not really"])), INVALID, "PNG"),
    ("truncated-png", pb.ScreenRequest(encoded=pb.EncodedImages(images=[truncated_png()])), INVALID, "image 0"),
    ("png-wrong-size", build_request([encode_png(np.zeros((1, 20, 16), np.float32))]), INVALID, "16x20"),
    ("decompression-bomb", pb.ScreenRequest(encoded=pb.EncodedImages(images=[png_bomb()])), INVALID, "image 0"),
    ("gif-not-accepted", pb.ScreenRequest(encoded=pb.EncodedImages(images=[gif()])), INVALID, "PNG or JPEG"),
    ("too-many-files", pb.ScreenRequest(encoded=pb.EncodedImages(images=[jpeg()] * 65)), INVALID, "limit of 64"),
]

KSERVE_CASES = [
    ("unknown-model", kserve(raw=ONE_IMAGE, model="resnet"), grpc.StatusCode.NOT_FOUND, "'resnet'"),
    ("unknown-version", kserve(raw=ONE_IMAGE, version="7"), grpc.StatusCode.NOT_FOUND, "version '7'"),
    ("wrong-datatype", kserve("INT32", raw=ONE_IMAGE), INVALID, "INT32"),
    ("wrong-shape", kserve(shape=(1, 1, 28, 28), raw=np.zeros(784, np.float32).tobytes()), INVALID, "(1, 16, 16)"),
    ("byte-count", kserve(raw=ONE_IMAGE[:-1]), INVALID, "bytes"),
    ("typed-count", kserve(typed=[0.5] * 10), INVALID, "10 values"),
    ("no-data", kserve(), INVALID, "no data"),
    ("raw-and-typed", kserve(raw=ONE_IMAGE, typed=GOOD[0].ravel().tolist()), INVALID, "not both"),
    ("wrong-input-name", kserve(raw=ONE_IMAGE, name="input__0"), INVALID, "'images'"),
    ("unknown-output", kserve(raw=ONE_IMAGE, outputs=["logits"]), INVALID, "logits"),
    ("three-d-shape", kserve(shape=(1, 16, 16), raw=ONE_IMAGE), INVALID, "4-D"),
    ("output-parameter", "classification", INVALID, "'classification' is not supported"),
    ("nan", kserve(raw=NAN[:1].tobytes()), INVALID, "NaN"),
    ("out-of-range", kserve(raw=(GOOD[:1] * 3).tobytes()), INVALID, "[0, 1]"),
    ("uint8-typed-over-255", "uint8", INVALID, "[0, 255]"),
]


def _classification() -> kserve_pb2.ModelInferRequest:
    req = kserve(raw=ONE_IMAGE, outputs=["probabilities"])
    req.outputs[0].parameters["classification"].int64_param = 3
    return req


def _uint8_over_255() -> kserve_pb2.ModelInferRequest:
    req = kserve(datatype="UINT8")
    req.inputs[0].contents.uint_contents.extend([300] * 256)
    return req


@pytest.fixture(scope="module")
def channel(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def assert_still_serving(channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    ok = pb_grpc.PathGuardStub(channel).ScreenImages(tensor_request(GOOD), timeout=30)
    assert len(ok.results) == len(GOOD)


@pytest.mark.parametrize("case", OWN_CASES, ids=[c[0] for c in OWN_CASES])
def test_own_api_bad_input(channel, case):
    _, request, code, words = case
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.PathGuardStub(channel).ScreenImages(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert words in info.value.details()
    assert_still_serving(channel)


@pytest.mark.parametrize("case", KSERVE_CASES, ids=[c[0] for c in KSERVE_CASES])
def test_kserve_bad_input(channel, case):
    _, request, code, words = case
    request = (
        {"uint8": _uint8_over_255, "classification": _classification}[request]()
        if isinstance(request, str)
        else request
    )
    with pytest.raises(grpc.RpcError) as info:
        kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert words in info.value.details()
    assert_still_serving(channel)


def test_kserve_metadata_of_unknown_model_is_not_found(channel):
    stub = kserve_grpc.GRPCInferenceServiceStub(channel)
    for call, req in (
        (stub.ModelMetadata, kserve_pb2.ModelMetadataRequest(name="nope")),
        (stub.ModelReady, kserve_pb2.ModelReadyRequest(name="nope")),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_oversized_message_is_resource_exhausted(request, tiny_bundle):
    server = shared_server(request, tiny_bundle)
    big = pb.ScreenRequest(encoded=pb.EncodedImages(images=[b"\0" * (17 << 20)]))
    with PathGuardClient(server.target, max_message_mb=64) as client:
        with pytest.raises(grpc.RpcError) as info:
            client._stub.ScreenImages(big, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(server.target) as ch:
        assert_still_serving(ch)


def test_kserve_binary_data_output_parameter_is_honoured(channel):
    """binary_data=true asks for raw bytes, which gRPC outputs always are: accepted, and the output is raw."""
    req = kserve(raw=ONE_IMAGE, outputs=["adversarial_score"])
    req.outputs[0].parameters["binary_data"].bool_param = True
    response = kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30)
    assert [o.name for o in response.outputs] == ["adversarial_score"]
    assert len(response.raw_output_contents[0]) == 4  # one FP32 score
