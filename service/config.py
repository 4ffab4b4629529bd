"""Typed configuration of ``pathguard serve`` and ``pathguard screen``: fields, defaults, validation.

The command line (:mod:`pathguard.options`) makes each field a ``--flag`` and a ``PATHGUARD_<FIELD>``
environment variable (``max_batch_size`` is ``--max-batch-size`` and ``PATHGUARD_MAX_BATCH_SIZE``); the
help text of each is in the field's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detector.bundle import DEFAULT_BUNDLE

from .batching import MAX_BATCH_SIZE, MAX_QUEUE_DELAY_MS, MAX_QUEUE_SIZE

# 64 CIFAR-size FP32 images are 64 * 3 * 32 * 32 * 4 B = 0.75 MiB; 16 MiB leaves room for larger inputs and
# PNG batches while still bounding what one request can make the server allocate.
DEFAULT_MAX_MESSAGE_MB = 16

def _opt(help_text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class ServeConfig:
    """``pathguard serve``: what the server loads, where it listens and how it batches."""

    bundle: str = _opt("bundle directory to serve", DEFAULT_BUNDLE)
    host: str = _opt("address to listen on (gRPC and metrics)", "0.0.0.0")
    port: int = _opt("gRPC port (0: any free port)", 50051)
    metrics_port: int = _opt("Prometheus /metrics HTTP port (0: any free port)", 8002)
    # 0 asks the cgroup CPU quota: a container limited to 2 CPUs on a 64-core node must not start 64 threads.
    threads: int = _opt("torch intra-op threads per worker (0: the CPU quota of this container shared out over "
                        "the workers)", 0)
    # One process runs Python on one core at a time; more cores serve more calls with more processes.
    workers: int = _opt("server processes sharing the port (SO_REUSEPORT), each with its own model copy "
                        "(0: one per CPU of the quota)", 1)
    max_batch_size: int = _opt("most images the model computes in one batch", MAX_BATCH_SIZE)
    max_queue_delay_ms: float = _opt("longest a request waits for others to join its batch", MAX_QUEUE_DELAY_MS)
    max_queue_size: int = _opt("most requests waiting for the model; more get RESOURCE_EXHAUSTED", MAX_QUEUE_SIZE)
    grace_period: float = _opt("seconds accepted calls get to finish after SIGTERM", 20.0)
    max_message_mb: int = _opt("largest request or response message, MiB", DEFAULT_MAX_MESSAGE_MB)
    max_images_per_request: int = _opt("most images in one request", 64)
    engine: str = _opt("how the model runs: skipping (only filters whose gate is on; faster) or masked", "skipping")
    tls_cert: str | None = _opt("PEM server certificate (chain); enables TLS")
    tls_key: str | None = _opt("PEM private key of --tls-cert")
    tls_client_ca: str | None = _opt("PEM CA bundle; clients must present a certificate it signed (mTLS)")
    auth_token_file: str | None = _opt("file holding the bearer token callers must send (health is exempt)")

    def validate(self) -> ServeConfig:
        """Raise ``ValueError`` naming the first field out of range; return self."""
        self._check_numbers()
        self._check_security()
        return self

    def _check_numbers(self) -> None:
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 65535]")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers} must be >= 0 (0: one per CPU)")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0: the CPU quota)")
        for name in ("max_batch_size", "max_queue_size", "max_message_mb", "max_images_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("max_queue_delay_ms", "grace_period"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.engine not in ("skipping", "masked"):
            raise ValueError(f"engine={self.engine!r} must be 'skipping' or 'masked'")

    def _check_security(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"tls_cert={self.tls_cert!r} and tls_key={self.tls_key!r} must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"tls_client_ca={self.tls_client_ca!r} needs tls_cert and tls_key (mTLS is TLS)")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ValueError(f"{name}={value!r} is not a readable file")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


@dataclass
class ScreenConfig:
    """``pathguard screen``: where the server is and how to reach it."""

    target: str = _opt("server address HOST:PORT", "localhost:50051")
    token_file: str | None = _opt("file holding the bearer token to send")
    tls_ca: str | None = _opt("PEM CA bundle to verify the server with; enables TLS")
    client_cert: str | None = _opt("PEM client certificate, for a server that requires mTLS")
    client_key: str | None = _opt("PEM private key of --client-cert")
    timeout: float = _opt("seconds to wait for the answer", 30.0)
    top_k: int = _opt("show the k most probable classes (0: just the prediction)", 0)

    def validate(self) -> ScreenConfig:
        if self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout} must be > 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError(f"client_cert={self.client_cert!r} and client_key={self.client_key!r} "
                             "must be given together")
        return self
