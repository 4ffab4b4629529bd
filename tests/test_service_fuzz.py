"""Hypothesis fuzzing of the request surface (own API, KServe v2, raw wire bytes), bounded for CI.

The strategies and the reference oracle live in ``bench/fuzz.py``; ``python -m bench.fuzz --cases 10000`` is
the long run. Here a failing case is shrunk to a minimal one. The regressions the fuzzing found are pinned
below as plain tests.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_helpers import shared_server

from bench import fuzz
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service._proto.pathguard.v1 import pathguard_pb2 as pb
from service._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc
from service.errors import MAX_MESSAGE_BYTES

EXAMPLES = 300
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture(scope="module")
def server(request, tiny_bundle):
    return shared_server(request, tiny_bundle)


@pytest.fixture(scope="module")
def channel(server):
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.target, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def model(channel) -> fuzz.Model:
    return fuzz.describe_model(channel)


@pytest.fixture(scope="module")
def runner(channel, model) -> fuzz.Runner:
    return fuzz.Runner(channel, limit=model.max_message_bytes)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the in-process server's PIL warns
@FUZZ_SETTINGS  # on a 10^8-pixel header, then refuses
@given(data=st.data())
def test_fuzzed_requests_get_exactly_the_codes_they_deserve(runner, model, data):
    case = data.draw(fuzz.any_case(model), label="case")
    runner.run(case)  # raises fuzz.Violation (shrunk by hypothesis) on a wrong code or a wrong answer


def test_the_server_is_still_serving_after_fuzzing_and_holds_no_calls(server, channel, runner):
    assert runner.cases >= EXAMPLES, "run after the fuzz test"
    assert fuzz.serving(channel)
    ok = pb_grpc.PathGuardStub(channel).ScreenImages(
        pb.ScreenRequest(tensor=pb.Tensor(dtype=pb.UINT8, shape=[1, 1, 16, 16], data=bytes(256))), timeout=30
    )
    assert len(ok.results) == 1
    assert server.server._interceptor.active == 0 and server.server.service.queue_depth == 0
    seen = {code.split(":")[1] for code in runner.codes}
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= seen <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}


# -- regressions found by fuzzing ----------------------------------------------------------------------
MALFORMED = [
    (fuzz.SCREEN, b"\xff\xff\xff"),
    (fuzz.SCREEN, b"\x0a\x03\xff\xfe\xfd"),  # request_id: bad UTF-8
    (fuzz.SCREEN, b"\x1a\x05\x08\x01\x12\x01"),
    (fuzz.INFER, b"\x0a\x02\xc3\x28"),  # model_name
    (fuzz.INFER, b"\x22\x10\x0a"),
    (fuzz.DESCRIBE, b"\xff\xff\xff"),
]


@pytest.mark.parametrize(
    "method, payload",
    MALFORMED,
    ids=["corrupt", "bad-utf8-string", "truncated", "kserve-bad-utf8", "kserve-truncated", "describe-corrupt"],
)
def test_malformed_protobuf_is_invalid_argument(channel, method, payload):
    """gRPC itself answers UNKNOWN ("Unexpected DecodeError...") and logs a traceback per call."""
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method, request_serializer=None, response_deserializer=None)(payload, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "not a well-formed protobuf message" in info.value.details()


def test_malformed_protobuf_in_a_stream_and_to_health(channel):
    stream = channel.stream_stream(fuzz.STREAM, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([b"\x0a\x03\xff\xfe\xfd"]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    health = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        health(b"\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def _kserve(name: str = "pathguard", datatype: str = "FP32", shape=(1, 1, 16, 16)) -> kserve_pb2.ModelInferRequest:
    req = kserve_pb2.ModelInferRequest(model_name=name)
    req.inputs.add(name="images", datatype=datatype, shape=list(shape))
    req.raw_input_contents.append(bytes(1024))
    return req


@pytest.mark.parametrize(
    "request_, code",
    [
        (_kserve(name="m" * 100_000), grpc.StatusCode.NOT_FOUND),
        (_kserve(name="\u00e9\u4e2d\U0001f600" * 5_000), grpc.StatusCode.NOT_FOUND),
        (_kserve(datatype="Q" * 20_000), grpc.StatusCode.INVALID_ARGUMENT),
        (_kserve(shape=[7] * 50_000), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["long-model-name", "long-unicode-model-name", "long-datatype", "50k-dimensions"],
)
def test_an_echoed_value_never_changes_the_status_code(channel, request_, code):
    """Messages quote what was sent; unbounded, a long value pushed the status past the client's metadata limit
    and the caller got RESOURCE_EXHAUSTED or INTERNAL instead of the real code."""
    with pytest.raises(grpc.RpcError) as info:
        kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request_, timeout=10)
    assert info.value.code() == code, info.value.details()[:200]
    assert len(info.value.details().encode()) <= MAX_MESSAGE_BYTES


def test_the_oracle_knows_the_servers_receive_limit(server, channel, model):
    """A valid-looking request just over the limit the server derives from the model gets RESOURCE_EXHAUSTED, and
    the oracle expects exactly that (it once assumed 16 MiB and called the refusal a violation); one under the
    limit is judged on its content."""
    limit = server.server.config.receive_limit(model.input_shape)
    assert model.max_message_bytes == limit
    over = pb.ScreenRequest(encoded=pb.EncodedImages(images=[b"\x89PNG" + bytes(limit)])).SerializeToString()
    case = fuzz.Case(fuzz.SCREEN, over, frozenset({fuzz.INVALID}), 0, "oversized file")
    strict = fuzz.Runner(channel)  # no limit known: the refusal is a violation
    with pytest.raises(fuzz.Violation, match="RESOURCE_EXHAUSTED"):
        strict.run(case)
    assert fuzz.Runner(channel, limit=limit).run(case) == fuzz.EXHAUSTED
    stream = fuzz.Case(fuzz.STREAM, [over], [frozenset({fuzz.INVALID})], [0], "stream with an oversized file")
    assert fuzz.Runner(channel, limit=limit).run(stream) == fuzz.EXHAUSTED
    under = pb.ScreenRequest(encoded=pb.EncodedImages(images=[b"not an image"])).SerializeToString()
    bad = fuzz.Case(fuzz.SCREEN, under, frozenset({fuzz.INVALID}), 0, "bad")
    assert fuzz.Runner(channel, limit=limit).run(bad) == fuzz.INVALID
