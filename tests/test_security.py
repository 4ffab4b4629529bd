"""Security, beyond tests/test_service_security.py: every protected RPC needs the token, mTLS and the token
together, the client refuses an untrusted server, request data and secrets never echo where they should not,
and nothing is unpickled (a source scan and an audit hook over a full screening run)."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import THREADS, config_for, make_certificates
from synthetic import make_images

from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service._proto.pathguard.v1 import pathguard_pb2 as pb
from service._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc
from service.client import PathGuardClient
from service.server import BackgroundServer

REPO = Path(__file__).resolve().parent.parent
TOKEN = "tok-7c0ffee-for-tests"
CANARY = "CANARY-51f3a9e2"  # a string no server output has any business containing
X, _ = make_images(2, seed=71)
PROTECTED = [
    (service.full_name, method)
    for service in (
        pb.DESCRIPTOR.services_by_name["PathGuard"],
        kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    )
    for method in service.methods
]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_server(tiny_bundle, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN)
    with BackgroundServer(config_for(tiny_bundle, auth_token_file=str(token_file))) as bg:
        yield bg


def call(channel: grpc.Channel, service: str, method, metadata=()) -> grpc.StatusCode:
    """Invoke ``method`` with an empty request message; the status code (OK when it answered)."""
    path = f"/{service}/{method.name}"
    try:
        if method.client_streaming:
            responses = channel.stream_stream(path, request_serializer=None, response_deserializer=None)(
                iter([b""]), timeout=20, metadata=metadata
            )
            list(responses)
        else:
            channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                b"", timeout=20, metadata=metadata
            )
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# ----------------------------------------------------------------------------------------------------
# authentication and transport security
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("service, method", PROTECTED, ids=[f"{s.split('.')[-1]}.{m.name}" for s, m in PROTECTED])
def test_every_rpc_of_the_protected_services_needs_the_token(token_server, service, method):
    with grpc.insecure_channel(token_server.target) as channel:
        assert call(channel, service, method) == grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, service, method, (("authorization", "Bearer nope"),)) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            call(channel, service, method, (("authorization", f"Bearer {TOKEN}"),)) != grpc.StatusCode.UNAUTHENTICATED
        )


@pytest.mark.parametrize(
    "header",
    [
        TOKEN,  # no scheme
        f"Basic {TOKEN}",
        f"Bearer {TOKEN[:-1]}",  # a prefix
        f"Bearer {TOKEN}x",  # an extension
        f"Bearer {TOKEN.upper()}",
        "Bearer ",
        "Bearer",
        f"Bearer {TOKEN} {TOKEN}",
    ],
)
def test_near_miss_tokens_are_refused(token_server, header):
    with PathGuardClient(token_server.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client._stub.DescribeModel(pb.DescribeModelRequest(), timeout=10, metadata=(("authorization", header),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in (info.value.details() or "")


def test_the_first_authorization_header_decides(token_server):
    """A wrong token followed by the right one is refused: a proxy that appends headers cannot be used to
    smuggle a second credential past the first."""
    with PathGuardClient(token_server.target) as client:
        both = (("authorization", "Bearer nope"), ("authorization", f"Bearer {TOKEN}"))
        with pytest.raises(grpc.RpcError) as info:
            client._stub.DescribeModel(pb.DescribeModelRequest(), timeout=10, metadata=both)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with PathGuardClient(token_server.target, token=TOKEN, insecure_token=True) as client:  # scheme: any case
        assert client._stub.DescribeModel(
            pb.DescribeModelRequest(), timeout=10, metadata=(("authorization", f"bearer {TOKEN}"),)
        ).name


def test_mtls_and_token_are_both_required(tiny_bundle, certs, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    cfg = config_for(
        tiny_bundle,
        tls_cert=str(certs["server"]),
        tls_key=str(certs["server_key"]),
        tls_client_ca=str(certs["ca"]),
        auth_token_file=str(token_file),
    )
    with BackgroundServer(cfg) as bg:
        mtls = {"tls_ca": certs["ca"], "client_cert": certs["client"], "client_key": certs["client_key"]}
        with PathGuardClient(bg.target, token=TOKEN, **mtls) as both:
            assert len(both.screen(X)) == 2
        with PathGuardClient(bg.target, **mtls) as cert_only:
            with pytest.raises(grpc.RpcError) as info:
                cert_only.screen(X)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with PathGuardClient(bg.target, token=TOKEN, tls_ca=certs["ca"], timeout=5) as token_only:
            with pytest.raises(grpc.RpcError) as info:
                token_only.screen(X)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no handshake without a client certificate


def test_the_client_refuses_a_server_it_does_not_trust(tiny_bundle, certs, tmp_path):
    other = make_certificates(tmp_path / "other")  # another CA, which did not sign the server's certificate
    cfg = config_for(tiny_bundle, tls_cert=str(certs["server"]), tls_key=str(certs["server_key"]))
    with BackgroundServer(cfg) as bg:
        with PathGuardClient(bg.target, tls_ca=other["ca"], token=TOKEN, timeout=5) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.screen(X)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with PathGuardClient(bg.target, tls_ca=certs["ca"]) as trusting:
            assert len(trusting.screen(X)) == 2


# ----------------------------------------------------------------------------------------------------
# nothing echoes where it should not
# ----------------------------------------------------------------------------------------------------
def test_request_data_and_secrets_never_reach_metrics_health_or_logs(tiny_bundle, tmp_path, caplog):
    """A distinctive string goes into metadata, the bearer token, the request id and invalid fields of both
    APIs. It may come back only in the error message of the very field that was wrong (quoted for the
    caller); never in /metrics, health answers, other error messages or the server's log."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    caplog.set_level(logging.DEBUG)
    meta = ((f"x-{CANARY.lower()}", CANARY), ("x-note", CANARY))
    details: list[tuple[str, str]] = []
    with BackgroundServer(config_for(tiny_bundle, auth_token_file=str(token_file))) as bg:
        channel = grpc.insecure_channel(bg.target)
        own, kserve = pb_grpc.PathGuardStub(channel), kserve_grpc.GRPCInferenceServiceStub(channel)
        auth = (("authorization", f"Bearer {TOKEN}"), *meta)

        def expect_error(name: str, rpc, request, metadata=auth) -> None:
            try:
                rpc(request, timeout=20, metadata=metadata)
                details.append((name, "OK"))
            except grpc.RpcError as exc:
                details.append((name, f"{exc.code().name}: {exc.details()}"))

        good = pb.Tensor(dtype=pb.FLOAT32, shape=list(X.shape), data=X.tobytes())
        ok = own.ScreenImages(pb.ScreenRequest(request_id=CANARY, tensor=good), timeout=20, metadata=auth)
        assert ok.request_id == CANARY  # echoed to its own caller, by design
        expect_error("token", own.ScreenImages, pb.ScreenRequest(tensor=good), (("authorization", f"Bearer {CANARY}"),))
        expect_error(
            "nan+id",
            own.ScreenImages,
            pb.ScreenRequest(
                request_id=CANARY,
                tensor=pb.Tensor(dtype=pb.FLOAT32, shape=list(X.shape), data=np.full_like(X, np.nan).tobytes()),
            ),
        )
        expect_error(
            "png",
            own.ScreenImages,
            pb.ScreenRequest(request_id=CANARY, encoded=pb.EncodedImages(images=[CANARY.encode() * 10])),
        )
        for field, value in (("model_name", CANARY), ("id", CANARY)):
            req = kserve_pb2.ModelInferRequest(**{"model_name": "pathguard", field: value})
            req.inputs.add(name="images", datatype="FP32", shape=list(X.shape))
            req.raw_input_contents.append(X.tobytes()[:-4])
            expect_error(f"kserve.{field}", kserve.ModelInfer, req)
        bad_dtype = kserve_pb2.ModelInferRequest(model_name="pathguard")
        bad_dtype.inputs.add(name=CANARY, datatype=CANARY, shape=[1, 1, 16, 16])
        expect_error("kserve.input", kserve.ModelInfer, bad_dtype)
        expect_error("metadata", kserve.ModelMetadata, kserve_pb2.ModelMetadataRequest(name=CANARY))

        health = health_pb2_grpc.HealthStub(channel)
        answers = [str(health.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=meta))]
        try:
            health.Check(health_pb2.HealthCheckRequest(service=CANARY), timeout=10, metadata=meta)
        except grpc.RpcError as exc:
            answers.append(f"{exc.code().name}: {exc.details()}")
        metrics_text = urllib.request.urlopen(bg.metrics_url, timeout=10).read().decode()
        channel.close()

    by_name = dict(details)
    # where the caller's own wrong value may be quoted back (bounded), and where it must not
    quoted = {"kserve.model_name", "kserve.input", "metadata"}
    for name, text in details:
        if name not in quoted:
            assert CANARY not in text, (name, text)
    assert by_name["token"] == "UNAUTHENTICATED: invalid bearer token"
    assert by_name["kserve.model_name"].startswith("NOT_FOUND")
    assert by_name["kserve.id"].startswith("INVALID_ARGUMENT")
    assert all(CANARY not in a for a in answers), answers
    assert CANARY not in metrics_text and TOKEN not in metrics_text
    assert "pathguard_requests_total" in metrics_text  # the scrape did see the calls
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert CANARY not in logged and TOKEN not in logged


# ----------------------------------------------------------------------------------------------------
# no pickle
# ----------------------------------------------------------------------------------------------------
SCANNED = ("detector", "service", "pathguard", "bench")
# The one place allowed to unpickle: CIFAR-10's "python version" batches, through an allow-list Unpickler.
ALLOWED_UNPICKLER = ("detector/data/formats.py", "_ArraysOnly")
_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "jsonpickle", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def unpickling_sites(source: str, path: str) -> list[str]:
    """Calls and classes in ``source`` that can unpickle, as "path:line: what"."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b) for b in node.bases}
            if bases & {"pickle.Unpickler", "Unpickler", "_pickle.Unpickler"}:
                defines = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                if (path, node.name) != ALLOWED_UNPICKLER or "find_class" not in defines:
                    found.append(f"{where}: Unpickler subclass {node.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, tail = name.rpartition(".")
        if head in _PICKLE_MODULES and tail in {"load", "loads", "Unpickler", "open", "decode"}:
            found.append(f"{where}: {name}()")
        elif name.endswith("torch.load"):
            if _keyword(node, "weights_only") is not True:
                found.append(f"{where}: {name}() without weights_only=True")
        elif name.endswith("jit.load") or name.endswith("read_pickle") or name.endswith("yaml.unsafe_load"):
            found.append(f"{where}: {name}()")
        elif name.endswith("yaml.load") and "Safe" not in _dotted(_keyword(node, "Loader") or ast.Name("")):
            found.append(f"{where}: {name}() without a SafeLoader")
        elif name in {"np.load", "numpy.load"} and _keyword(node, "allow_pickle") not in (None, False):
            found.append(f"{where}: {name}(allow_pickle=...)")
    return found


def test_the_pickle_scan_finds_what_it_looks_for():
    snippet = textwrap.dedent("""
        import pickle, torch, numpy as np, joblib, yaml
        pickle.loads(b"")
        torch.load("m.pt")
        torch.load("m.pt", weights_only=False)
        np.load("a.npy", allow_pickle=True)
        joblib.load("m.joblib")
        yaml.load(text)
        torch.jit.load("m.ts")
        class Mine(pickle.Unpickler):
            pass
        torch.load("m.pt", weights_only=True)  # fine
        np.load("a.npy")  # fine: allow_pickle defaults to False
        yaml.load(text, Loader=yaml.SafeLoader)  # fine
    """)
    found = unpickling_sites(snippet, "x.py")
    assert len(found) == 8, found


def test_no_code_path_can_unpickle_except_the_allow_listed_cifar_reader():
    found = []
    for package in SCANNED:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if "/_proto/" in rel:
                continue
            found += unpickling_sites(path.read_text(), rel)
    assert found == []
    formats = (REPO / ALLOWED_UNPICKLER[0]).read_text()
    assert f"class {ALLOWED_UNPICKLER[1]}(pickle.Unpickler)" in formats and "def find_class" in formats


AUDIT_SCRIPT = """
import sys, json
events = []
sys.addaudithook(lambda event, args: events.append(f"{args[0]}.{args[1]}") if event == "pickle.find_class" else None)

import pickle, datetime
pickle.loads(pickle.dumps(datetime.date(2020, 1, 1)))  # control: the hook sees an unpickling
control, events[:] = list(events), []

import numpy as np, torch, grpc
from detector import load_bundle
from service.client import PathGuardClient
from service.codec import encode_png
from service.server import BackgroundServer
from service.config import ServeConfig
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2, grpc_predict_v2_pb2_grpc as kserve_grpc

bundle = sys.argv[1]
x = np.random.default_rng(0).uniform(0, 1, (4, 1, 16, 16)).astype(np.float32)
load_bundle(bundle).screen(torch.from_numpy(x))  # in process
cfg = ServeConfig(bundle=bundle, host="127.0.0.1", port=0, metrics_port=0, threads=int(sys.argv[2]))
with BackgroundServer(cfg) as bg, PathGuardClient(bg.target) as client:  # and served
    client.screen(x, include_path=True)
    client.screen([encode_png(img) for img in x])
    list(client.screen_stream([x[:2], x[2:]]))
    req = kserve_pb2.ModelInferRequest(model_name="pathguard")
    req.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(bg.target) as ch:
        kserve_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60)
    bg.reload(bundle)
    client.screen(x)
print(json.dumps({"control": control, "events": events}))
"""


def test_an_audit_hook_sees_no_unpickling_during_a_full_screening_run(tiny_bundle):
    """The hook is installed before anything of PathGuard (or torch) is imported, so it covers imports,
    bundle loading, screening in process and over both APIs, streaming and a reload."""
    out = subprocess.run(
        [sys.executable, "-c", AUDIT_SCRIPT, str(tiny_bundle), str(THREADS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["control"] == ["datetime.date"]
    assert result["events"] == []
