"""TLS, mTLS and bearer-token auth, end to end with throwaway certificates."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import config_for, make_certificates
from synthetic import make_images

from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.client import PathGuardClient
from service.server import BackgroundServer

TOKEN = "s3cret-token"
X, _ = make_images(1, seed=51)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def expect_code(code: grpc.StatusCode, call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    return info.value


def test_tls_with_bearer_token(tiny_bundle, certs, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = config_for(tiny_bundle, tls_cert=str(certs["server"]), tls_key=str(certs["server_key"]),
                     auth_token_file=str(token_file))
    with BackgroundServer(cfg) as bg:
        with PathGuardClient(bg.target, tls_ca=certs["ca"], token=TOKEN) as client:
            assert len(client.screen(X)) == 1
            assert client.describe().name
        with PathGuardClient(bg.target, tls_ca=certs["ca"]) as anonymous:
            assert anonymous.health() == "SERVING"  # health is exempt from auth
            err = expect_code(grpc.StatusCode.UNAUTHENTICATED, anonymous.screen, X)
            assert "missing bearer token" in err.details()
        with PathGuardClient(bg.target, tls_ca=certs["ca"], token="wrong") as wrong:
            assert expect_code(grpc.StatusCode.UNAUTHENTICATED, wrong.screen, X).details() == "invalid bearer token"
        channel = grpc.secure_channel(bg.target, grpc.ssl_channel_credentials(certs["ca"].read_bytes()))
        with channel:
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)
            expect_code(grpc.StatusCode.UNAUTHENTICATED, stub.ServerReady, kserve_pb2.ServerReadyRequest(), timeout=10)
            ready = stub.ServerReady(kserve_pb2.ServerReadyRequest(), timeout=10,
                                     metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert ready.ready
        with PathGuardClient(bg.target, token=TOKEN, timeout=5) as plaintext:
            expect_code(grpc.StatusCode.UNAVAILABLE, plaintext.screen, X)  # no TLS handshake, no service


def test_mtls_requires_a_client_certificate_from_the_ca(tiny_bundle, certs):
    cfg = config_for(tiny_bundle, tls_cert=str(certs["server"]), tls_key=str(certs["server_key"]),
                     tls_client_ca=str(certs["ca"]))
    with BackgroundServer(cfg) as bg:
        with PathGuardClient(bg.target, tls_ca=certs["ca"], client_cert=certs["client"],
                             client_key=certs["client_key"]) as client:
            assert len(client.screen(X)) == 1
        with PathGuardClient(bg.target, tls_ca=certs["ca"], timeout=5) as no_cert:
            expect_code(grpc.StatusCode.UNAVAILABLE, no_cert.screen, X)
        with PathGuardClient(bg.target, tls_ca=certs["ca"], client_cert=certs["rogue"],
                             client_key=certs["rogue_key"], timeout=5) as rogue:
            expect_code(grpc.StatusCode.UNAVAILABLE, rogue.screen, X)
        channel = grpc.secure_channel(bg.target, grpc.ssl_channel_credentials(
            certs["ca"].read_bytes(), certs["client_key"].read_bytes(), certs["client"].read_bytes()))
        with channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
