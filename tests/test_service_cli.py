"""Configuration (flag > env > default), the documented contract, `pathguard screen`, code generation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from service_helpers import THREADS, shared_server
from synthetic import make_images

from bench.helpers import loopback_serve_args
from detector.bundle import DEFAULT_BUNDLE
from pathguard.main import build_parser, main
from pathguard.options import config_from, env_name
from service import codegen
from service.codec import encode_png
from service.config import ScreenConfig, ServeConfig

README = Path(__file__).resolve().parent.parent / "service" / "README.md"


def test_flag_wins_over_env_wins_over_default():
    args = build_parser().parse_args(["serve", "--port", "6000", "--max-queue-delay-ms", "2.5"])
    env = {"PATHGUARD_PORT": "7000", "PATHGUARD_THREADS": "3", "PATHGUARD_GRACE_PERIOD": "", "OTHER": "x"}
    cfg = config_from(ServeConfig, args, env)
    assert (cfg.port, cfg.max_queue_delay_ms, cfg.threads) == (6000, 2.5, 3)
    assert cfg.grace_period == 20.0 and cfg.metrics_port == 8002 and cfg.max_batch_size == 32
    # bare `pathguard serve` listens on loopback only; PATHGUARD_HOST (set by the image) or --host opens it
    assert cfg.bundle == DEFAULT_BUNDLE and cfg.host == "127.0.0.1" and cfg.tls_cert is None
    assert config_from(ServeConfig, None, {"PATHGUARD_HOST": "0.0.0.0"}).host == "0.0.0.0"
    assert config_from(ServeConfig, build_parser().parse_args(["serve", "--host", "::"]), {}).host == "::"
    screen = config_from(
        ScreenConfig, build_parser().parse_args(["screen", "--tls", "x.png"]), {"PATHGUARD_INSECURE_TOKEN": "yes"}
    )
    assert screen.tls is True and screen.insecure_token is True
    with pytest.raises(ValueError, match="PATHGUARD_TLS='maybe'"):
        config_from(ScreenConfig, None, {"PATHGUARD_TLS": "maybe"})


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="PATHGUARD_PORT='http'"):
        config_from(ServeConfig, None, {"PATHGUARD_PORT": "http"})
    with pytest.raises(ValueError, match="max_batch_size=0"):
        config_from(ServeConfig, None, {"PATHGUARD_MAX_BATCH_SIZE": "0"})
    with pytest.raises(ValueError, match="tls_key"):
        config_from(ServeConfig, None, {"PATHGUARD_TLS_CERT": __file__})
    with pytest.raises(ValueError, match="engine='fast'"):
        config_from(ServeConfig, None, {"PATHGUARD_ENGINE": "fast"})
    with pytest.raises(ValueError, match="auth_token_file='/nonexistent'"):
        config_from(ServeConfig, None, {"PATHGUARD_AUTH_TOKEN_FILE": "/nonexistent"})


def test_contract_flags_and_env_names_are_documented():
    """Deployments rely on these exact flags and variables: every one is in the README's table."""
    readme = README.read_text()
    section = readme[readme.index("## Configuration") : readme.index("## The own API")]
    contract = [
        "bundle",
        "model_name",
        "host",
        "port",
        "metrics_port",
        "threads",
        "workers",
        "max_batch_size",
        "max_queue_delay_ms",
        "max_queue_size",
        "max_queue_images",
        "grace_period",
        "max_message_mb",
        "max_images_per_request",
        "max_request_memory_mb",
        "engine",
        "score_policy",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "auth_token_file",
        "max_connection_age",
        "max_connection_age_grace",
        "keepalive_min_interval",
        "watchdog_seconds",
        "liveness_seconds",
    ]
    assert [f.name for f in dataclasses.fields(ServeConfig)] == contract
    for name in contract:
        assert f"| `--{name.replace('_', '-')}` | `{env_name(name)}` |" in section, name
    for f in dataclasses.fields(ScreenConfig):
        assert f"`--{f.name.replace('_', '-')}`" in section and env_name(f.name) in section, f.name


def test_pathguard_screen_prints_json_and_a_table(request, tiny_bundle, tmp_path, capsys):
    server = shared_server(request, tiny_bundle)
    x, _ = make_images(3, seed=61)
    png = tmp_path / "one.png"
    png.write_bytes(encode_png(x[0]))
    npy = tmp_path / "two.npy"
    np.save(npy, x[1:])
    wrong = tmp_path / "wrong.png"
    wrong.write_bytes(encode_png(np.zeros((1, 8, 8), np.float32)))

    assert main(["screen", "--target", server.target, "--json", str(png), str(npy)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == [str(png), f"{npy}[0]", f"{npy}[1]"]
    assert all(0 <= r["adversarial_score"] <= 1 and r["class_name"] for r in rows)

    assert main(["screen", "--target", server.target, "--top-k", "2", str(png), str(wrong)]) == 1
    table = capsys.readouterr().out
    assert rows[0]["class_name"] in table and "ERROR INVALID_ARGUMENT" in table and "threshold" in table


def test_pathguard_screen_reports_an_unreachable_server_and_a_missing_file(tmp_path, capsys):
    png = tmp_path / "x.png"
    png.write_bytes(encode_png(np.zeros((1, 16, 16), np.float32)))
    assert main(["screen", "--target", "127.0.0.1:1", "--timeout", "2", str(png)]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    # a missing file is marked and the run goes on (here to the unreachable server)
    assert main(["screen", "--target", "127.0.0.1:1", "--batch", "4", str(tmp_path / "missing.png"), str(png)]) == 1
    out, err = capsys.readouterr()
    assert "no such file" in out and "UNAVAILABLE" in err


def test_serve_refuses_a_broken_bundle_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope"
    code = main(loopback_serve_args(missing, THREADS))
    assert code == 2
    assert f"bundle {missing}" in capsys.readouterr().err


def test_generated_code_is_reproducible(tmp_path):
    """`python -m service.codegen` reproduces the committed service/_proto byte for byte."""
    from grpc_tools import protoc  # noqa: F401  (fail clearly if grpcio-tools is missing)

    committed = sorted(
        p.relative_to(codegen.OUT_DIR)
        for p in codegen.OUT_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    fresh_dir = tmp_path / "_proto"
    fresh = sorted(p.relative_to(fresh_dir) for p in codegen.generate(fresh_dir))
    grpc_file = "pathguard/v1/pathguard_pb2_grpc.py"

    def version_of(root):
        lines = (root / grpc_file).read_text().splitlines()
        return next(line for line in lines if line.startswith("GRPC_GENERATED_VERSION"))

    # pyproject pins grpcio-tools to the version that generated service/_proto, so they always agree; a
    # mismatch means the pin and the committed code drifted apart (bump both: the pin, then `make protos`).
    assert version_of(fresh_dir) == version_of(codegen.OUT_DIR), "grpcio-tools pin != generator of service/_proto"
    assert fresh == committed
    for rel in fresh:
        assert (fresh_dir / rel).read_bytes() == (codegen.OUT_DIR / rel).read_bytes(), f"{rel} differs: make protos"
