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
from detector.disclosure import SCORE_POLICIES, check_policy

from .batching import MAX_BATCH_SIZE, MAX_QUEUE_DELAY_MS, MAX_QUEUE_SIZE

# The client's message limits (and the server's send limit): 16 MiB holds any answer and any request a
# server accepts. The server's receive limit is derived from the model instead: see receive_limit().
DEFAULT_MAX_MESSAGE_MB = 16
# Room for one encoded image beyond its raw FP64 size (PNG/JPEG headers, metadata chunks), and for the
# request's envelope (ids, shape, options).
ENCODED_ROOM_PER_IMAGE = 16 << 10
ENVELOPE_ROOM = 64 << 10


def _opt(help_text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": help_text})


def _switch(help_text: str) -> Any:
    """A bool set by the bare flag (``--tls``); the environment takes 1/0, true/false."""
    return field(default=False, metadata={"help": help_text, "switch": True})


@dataclass
class ServeConfig:
    """``pathguard serve``: what the server loads, where it listens and how it batches."""

    bundle: str = _opt("bundle directory to serve", DEFAULT_BUNDLE)
    # KServe names the model after its InferenceService: --model-name={{.Name}} in the ServingRuntime.
    model_name: str | None = _opt("name the model is served under (KServe model_name; default: the bundle's)")
    # Loopback unless told otherwise: the image and the manifests set 0.0.0.0 (PATHGUARD_HOST).
    host: str = _opt("address to listen on (gRPC, metrics and probes); 0.0.0.0 for all interfaces", "127.0.0.1")
    port: int = _opt("gRPC port (0: any free port)", 50051)
    metrics_port: int = _opt(
        "HTTP port of Prometheus /metrics and the plaintext probes /healthz, /readyz (0: any free port)", 8002
    )
    # 0 asks the cgroup CPU quota: a container limited to 2 CPUs on a 64-core node must not start 64 threads.
    threads: int = _opt(
        "torch intra-op threads per worker (0: the CPU quota of this container shared out over the workers)", 0
    )
    # One process runs Python on one core at a time; more cores serve more calls with more processes.
    workers: int = _opt(
        "server processes sharing the port (SO_REUSEPORT), each with its own model copy (0: one per CPU of the quota)",
        1,
    )
    max_batch_size: int = _opt("most images the model computes in one batch", MAX_BATCH_SIZE)
    max_queue_delay_ms: float = _opt("longest a request waits for others to join its batch", MAX_QUEUE_DELAY_MS)
    max_queue_size: int = _opt("most requests waiting for the model; more get RESOURCE_EXHAUSTED", MAX_QUEUE_SIZE)
    max_queue_images: int = _opt("most images waiting for the model; more get RESOURCE_EXHAUSTED", 1024)
    grace_period: float = _opt("seconds accepted calls get to finish after SIGTERM", 20.0)
    max_message_mb: int = _opt(
        "largest request message, MiB (0: derived from the model's input shape and max_images_per_request)", 0
    )
    max_images_per_request: int = _opt("most images in one request", 64)
    max_request_memory_mb: int = _opt(
        "memory the requests in flight may take, MiB (charged per message before "
        "it is parsed; beyond it RESOURCE_EXHAUSTED)",
        384,
    )
    engine: str = _opt("how the model runs: skipping (only filters whose gate is on; faster) or masked", "skipping")
    # What callers see of each screening (detector.disclosure): the exact score helps a querying attacker.
    score_policy: str = field(
        default="full",
        metadata={
            "help": "what answers reveal: full (exact probabilities, score, threshold), rounded (score and "
            "probabilities on a 0.05 grid, no path) or flag (only the predicted class and the flag)",
            "choices": SCORE_POLICIES,
        },
    )
    tls_cert: str | None = _opt("PEM server certificate (chain); enables TLS")
    tls_key: str | None = _opt("PEM private key of --tls-cert")
    tls_client_ca: str | None = _opt("PEM CA bundle; clients must present a certificate it signed (mTLS)")
    auth_token_file: str | None = _opt(
        "file of bearer tokens callers may send, one a line (health is exempt); re-read on SIGHUP"
    )
    # Clients keep one HTTP/2 connection for as long as it lives; a maximum age makes them reconnect (and
    # re-resolve), so new pods behind a headless Service get traffic after a scale-out.
    max_connection_age: float = _opt("seconds before a connection is asked to close (GOAWAY; 0: never)", 300.0)
    max_connection_age_grace: float = _opt("seconds calls on an aged connection get to finish", 30.0)
    keepalive_min_interval: float = _opt(
        "shortest interval between client keepalive pings; faster pingers are disconnected", 10.0
    )
    watchdog_seconds: float = _opt("health NOT_SERVING (readiness) once the worker makes no progress this long", 30.0)
    liveness_seconds: float = _opt(
        "the `liveness` health service NOT_SERVING once the worker makes no progress "
        "this long (the liveness probe restarts the pod)",
        120.0,
    )

    def validate(self) -> ServeConfig:
        """Raise ``ValueError`` naming the first field out of range; return self."""
        self._check_numbers()
        if self.engine not in ("skipping", "masked"):
            raise ValueError(f"engine={self.engine!r} must be 'skipping' or 'masked'")
        check_policy(self.score_policy)
        self._check_security()
        return self

    def _check_numbers(self) -> None:
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 65535]")
        for name, zero in (("workers", "one per CPU"), ("threads", "the CPU quota")):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0: {zero})")
        for name in (
            "max_batch_size",
            "max_queue_size",
            "max_queue_images",
            "max_images_per_request",
            "max_request_memory_mb",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_queue_images < self.max_batch_size:
            raise ValueError(
                f"max_queue_images={self.max_queue_images} must be >= max_batch_size={self.max_batch_size}"
            )
        for name in (
            "max_queue_delay_ms",
            "grace_period",
            "max_message_mb",
            "max_connection_age",
            "max_connection_age_grace",
            "keepalive_min_interval",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("watchdog_seconds", "liveness_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")

    def _check_security(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"tls_cert={self.tls_cert!r} and tls_key={self.tls_key!r} must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"tls_client_ca={self.tls_client_ca!r} needs tls_cert and tls_key (mTLS is TLS)")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ValueError(f"{name}={value!r} is not a readable file")

    def receive_limit(self, input_shape: tuple[int, int, int]) -> int:
        """Largest request message in bytes: ``max_message_mb`` when set, else the largest request the model
        accepts -- ``max_images_per_request`` FP64 images (the widest pixel type; typed FP64 values take
        8 bytes each too) -- plus room per image for PNG/JPEG framing and for the envelope."""
        if self.max_message_mb:
            return self.max_message_mb << 20
        c, h, w = input_shape
        return self.max_images_per_request * (c * h * w * 8 + ENCODED_ROOM_PER_IMAGE) + ENVELOPE_ROOM


@dataclass
class ScreenConfig:
    """``pathguard screen``: where the server is and how to reach it."""

    target: str = _opt("server address HOST:PORT", "localhost:50051")
    token_file: str | None = _opt("file holding the bearer token to send (needs TLS, or --insecure-token)")
    tls: bool = _switch("use TLS, verifying the server with the system's CA roots")
    tls_ca: str | None = _opt("PEM CA bundle to verify the server with; enables TLS")
    insecure_token: bool = _switch("send the bearer token over a plaintext channel anyway (it travels in clear)")
    client_cert: str | None = _opt("PEM client certificate, for a server that requires mTLS")
    client_key: str | None = _opt("PEM private key of --client-cert")
    timeout: float = _opt("seconds to wait for the answer", 30.0)
    top_k: int = _opt("show the k most probable classes (0: just the prediction)", 0)
    batch: int = _opt("image files per call (0: the server's max_images_per_request)", 0)

    def validate(self) -> ScreenConfig:
        if self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout} must be > 0")
        for name in ("top_k", "batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError(
                f"client_cert={self.client_cert!r} and client_key={self.client_key!r} must be given together"
            )
        return self
