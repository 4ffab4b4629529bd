"""TLS, mTLS and bearer-token auth, end to end with throwaway certificates."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import config_for, make_certificates, sample, scrape
from synthetic import make_images

from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service._proto.pathguard.v1 import pathguard_pb2 as pb
from service._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc
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
    cfg = config_for(
        tiny_bundle, tls_cert=str(certs["server"]), tls_key=str(certs["server_key"]), auth_token_file=str(token_file)
    )
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
            ready = stub.ServerReady(
                kserve_pb2.ServerReadyRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
            assert ready.ready
        with pytest.raises(ValueError, match="over plaintext"):  # the client keeps the token off plaintext
            PathGuardClient(bg.target, token=TOKEN)
        with PathGuardClient(bg.target, token=TOKEN, timeout=5, insecure_token=True) as plaintext:
            expect_code(grpc.StatusCode.UNAVAILABLE, plaintext.screen, X)  # no TLS handshake, no service
        # the probes stay plaintext HTTP beside /metrics, so Kubernetes can probe a TLS server
        base = f"http://127.0.0.1:{bg.server.metrics_port}"
        for path in ("/healthz", "/readyz"):
            assert urllib.request.urlopen(base + path, timeout=10).read() == b"ok\n"


def test_mtls_requires_a_client_certificate_from_the_ca(tiny_bundle, certs):
    cfg = config_for(
        tiny_bundle, tls_cert=str(certs["server"]), tls_key=str(certs["server_key"]), tls_client_ca=str(certs["ca"])
    )
    with BackgroundServer(cfg) as bg:
        with PathGuardClient(
            bg.target, tls_ca=certs["ca"], client_cert=certs["client"], client_key=certs["client_key"]
        ) as client:
            assert len(client.screen(X)) == 1
        with PathGuardClient(bg.target, tls_ca=certs["ca"], timeout=5) as no_cert:
            expect_code(grpc.StatusCode.UNAVAILABLE, no_cert.screen, X)
        with PathGuardClient(
            bg.target, tls_ca=certs["ca"], client_cert=certs["rogue"], client_key=certs["rogue_key"], timeout=5
        ) as rogue:
            expect_code(grpc.StatusCode.UNAVAILABLE, rogue.screen, X)
        channel = grpc.secure_channel(
            bg.target,
            grpc.ssl_channel_credentials(
                certs["ca"].read_bytes(), certs["client_key"].read_bytes(), certs["client"].read_bytes()
            ),
        )
        with channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


BIG = 16 << 20


def test_unauthenticated_16_mib_request_is_refused_before_it_is_read(tiny_bundle, tmp_path):
    """Auth runs on the metadata: the body of a call without a valid token is never received or parsed
    (pathguard_request_bytes_parsed_total does not move), for unary and streaming calls of both APIs."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    # a receive limit above 16 MiB, so that only authentication can refuse these calls
    with BackgroundServer(config_for(tiny_bundle, auth_token_file=str(token_file), max_message_mb=64)) as bg:
        parsed = lambda: sample(scrape(bg.metrics_url), "pathguard_request_bytes_parsed_total")  # noqa: E731
        before = parsed()
        own = pb.ScreenRequest(encoded=pb.EncodedImages(images=[b"\0" * BIG]))
        infer = kserve_pb2.ModelInferRequest(model_name="pathguard")
        infer.inputs.add(name="images", datatype="FP32", shape=[1, 1, 16, 16])
        infer.raw_input_contents.append(b"\0" * BIG)
        options = [("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(bg.target, options=options) as channel:
            own_stub, kserve = pb_grpc.PathGuardStub(channel), kserve_grpc.GRPCInferenceServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                for call, request in ((own_stub.ScreenImages, own), (kserve.ModelInfer, infer)):
                    expect_code(grpc.StatusCode.UNAUTHENTICATED, call, request, timeout=30, metadata=metadata)
                with pytest.raises(grpc.RpcError) as info:
                    list(own_stub.ScreenStream(iter([own, own]), timeout=30, metadata=metadata))
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert parsed() == before, "a refused call's body was parsed"
            # the counter has teeth: an authorised call's bytes are counted
            ok = own_stub.ScreenImages(
                pb.ScreenRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=list(X.shape), data=X.tobytes())),
                timeout=30,
                metadata=(("authorization", f"Bearer {TOKEN}"),),
            )
            assert len(ok.results) == 1 and parsed() > before


def test_token_rotation_under_load_loses_no_authorised_call(tiny_bundle, tmp_path):
    """Old token -> both (SIGHUP) -> clients switch -> new only (SIGHUP): calls keep running throughout and
    every call made with a token valid at that moment succeeds."""
    old, new = "old-token-1", "new-token-2"
    token_file = tmp_path / "tokens"
    token_file.write_text(old + "\n")
    with BackgroundServer(config_for(tiny_bundle, auth_token_file=str(token_file))) as bg:
        clients = {t: PathGuardClient(bg.target, token=t, insecure_token=True, timeout=30) for t in (old, new)}
        current, stop, failures, done = [old], threading.Event(), [], [0]

        def caller() -> None:
            while not stop.is_set():
                token = current[0]
                try:
                    clients[token].screen(X)
                    done[0] += 1
                except grpc.RpcError as exc:
                    failures.append((token, exc.code(), exc.details()))

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            token_file.write_text(f"{old}\n{new}\n")
            assert bg.reload_credentials()
            time.sleep(0.3)
            current[0] = new  # clients roll over to the new token while both are valid
            time.sleep(0.3)
            token_file.write_text(new + "\n")
            assert bg.reload_credentials()
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert done[0] > 0 and failures == []
        expect_code(grpc.StatusCode.UNAUTHENTICATED, clients[old].screen, X)
        token_file.write_text("")  # an empty file is refused; the current token stays valid
        assert not bg.reload_credentials()
        assert len(clients[new].screen(X)) == 1
        for c in clients.values():
            c.close()


def test_tls_certificates_rotate_on_reload_without_dropping_calls(tiny_bundle, tmp_path):
    first, second = make_certificates(tmp_path / "first"), make_certificates(tmp_path / "second")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(first["server"], cert)
    shutil.copy(first["server_key"], key)
    with BackgroundServer(config_for(tiny_bundle, tls_cert=str(cert), tls_key=str(key))) as bg:
        with PathGuardClient(bg.target, tls_ca=first["ca"]) as old_conn:
            assert len(old_conn.screen(X)) == 1  # connected with the first certificate
            stop, failures, done = threading.Event(), [], [0]

            def caller() -> None:
                while not stop.is_set():
                    try:
                        old_conn.screen(X)
                        done[0] += 1
                    except grpc.RpcError as exc:
                        failures.append((exc.code(), exc.details()))

            thread = threading.Thread(target=caller)
            thread.start()
            try:
                shutil.copy(second["server"], cert)
                shutil.copy(second["server_key"], key)
                assert bg.reload_credentials()
                with PathGuardClient(bg.target, tls_ca=second["ca"]) as renewed:
                    assert len(renewed.screen(X)) == 1  # new handshakes present the second certificate
                with PathGuardClient(bg.target, tls_ca=first["ca"], timeout=5) as stale:
                    expect_code(grpc.StatusCode.UNAVAILABLE, stale.screen, X)
            finally:
                stop.set()
                thread.join(30)
            assert done[0] > 0 and failures == []  # the open connection kept working across the rotation
