"""Helpers for the service tests: in-process servers on loopback, metrics scraping, certificates."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from bench.helpers import sample, scrape  # noqa: F401  (re-exported for the tests)
from detector.bundle import sha256_file
from service.config import ServeConfig
from service.server import BackgroundServer

THREADS = int(os.environ.get("PATHGUARD_TEST_THREADS", "2"))
_SHARED = pytest.StashKey[dict]()


def config_for(bundle: Path | str, **overrides) -> ServeConfig:
    """A loopback config on free ports with the test's thread budget."""
    base = ServeConfig(bundle=str(bundle), host="127.0.0.1", port=0, metrics_port=0, threads=THREADS)
    return replace(base, **overrides)


def shared_server(request: pytest.FixtureRequest, bundle: Path | str) -> BackgroundServer:
    """One default-config server per bundle for the whole session (stopped at the end)."""
    servers = request.config.stash.setdefault(_SHARED, {})
    key = str(bundle)
    if key not in servers:
        servers[key] = BackgroundServer(config_for(bundle)).start()
        request.config.add_cleanup(servers[key].stop)
    return servers[key]


def permuted_bundle(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as model version 2 whose classifier rows are rotated by one, with the class names
    rotated to match: the same images get other class indices but the same class names."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    k = state["classifier.weight"].shape[0]
    order = [(j - 1) % k for j in range(k)]  # new class j is old class order[j]
    for name in ("classifier.weight", "classifier.bias"):
        state[name] = state[name][order].contiguous()
    save_file(state, str(dst / "model.safetensors"))
    meta = json.loads((dst / "bundle.json").read_text())
    meta["files"]["model.safetensors"] = sha256_file(dst / "model.safetensors")
    meta["classes"] = [meta["classes"][i] for i in order]
    meta["model_version"] = "2"
    (dst / "bundle.json").write_text(json.dumps(meta, indent=2))
    return dst


class GatedRunner:
    """Wraps a model runtime; each batch blocks until :meth:`release` (to hold requests in the queue)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.info = inner.info
        self.batches: list[int] = []
        self.started = threading.Event()
        self._gate = threading.Event()

    @property
    def input_shape(self):
        return self.inner.input_shape

    def screen(self, images):
        self.started.set()
        self._gate.wait(30)
        self.batches.append(len(images))
        return self.inner.screen(images)

    def release(self) -> None:
        self._gate.set()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        time.sleep(interval)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate (localhost, 127.0.0.1), a client certificate it signed and a
    client certificate from another CA. Returns PEM file paths by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject: str, issuer_name: x509.Name, issuer_key, public_key, *, ca: bool, usage=None, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(stem: str, cert, key=None) -> None:
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (folder / f"{stem}.key").write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build("pathguard test CA", name("pathguard test CA"), ca_key, ca_key.public_key(), ca=True)
    other = build("other CA", name("other CA"), other_key, other_key.public_key(), ca=True)
    server_key, client_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    server = build(
        "localhost",
        ca.subject,
        ca_key,
        server_key.public_key(),
        ca=False,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = build(
        "client", ca.subject, ca_key, client_key.public_key(), ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    rogue = build(
        "rogue", other.subject, other_key, rogue_key.public_key(), ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    write("ca", ca)
    write("server", server, server_key)
    write("client", client, client_key)
    write("rogue", rogue, rogue_key)
    return {
        "ca": folder / "ca.pem",
        **{stem: folder / f"{stem}.pem" for stem in ("server", "client", "rogue")},
        **{f"{stem}_key": folder / f"{stem}.key" for stem in ("server", "client", "rogue")},
    }
