"""The service's plaintext HTTP port: Prometheus ``/metrics`` and the probes ``/healthz`` and ``/readyz``.

The probes answer 200 ``ok`` or 503 with the reason, from :class:`Probes`, which the server keeps in step
with its gRPC health services (``liveness`` for ``/healthz``, the server's readiness for ``/readyz``). They
exist so that Kubernetes' probes work when gRPC is served with TLS: the kubelet's gRPC probe speaks
plaintext only. Like the metrics, they carry no secret and need no token.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, exposition


@dataclass
class Probes:
    """What the probes report; the server sets it, the HTTP thread reads it (plain attribute writes)."""

    live: bool = True
    ready: bool = False
    reason: str = "starting"


# Set by the ``--workers`` supervisor for each worker: where that worker's probes are written (JSON).
PROBE_FILE_ENV = "PATHGUARD_PROBE_FILE"


class FileProbes(Probes):
    """A worker process's probes: every change is also written to ``path`` (atomically, as JSON), where the
    supervisor's HTTP endpoint reads it (:func:`read_probe_file`)."""

    def __init__(self, path: str) -> None:
        object.__setattr__(self, "path", path)
        super().__init__()

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name in ("live", "ready", "reason") and hasattr(self, "reason"):
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"live": self.live, "ready": self.ready, "reason": self.reason}, f)
            os.replace(tmp, self.path)


def worker_probes() -> Probes:
    """The probes of a ``--workers`` worker: written where the supervisor reads them (plain ones without it)."""
    path = os.environ.get(PROBE_FILE_ENV)
    return FileProbes(path) if path else Probes()


def read_probe_file(path: str) -> Probes | None:
    """A worker's probes as it last wrote them; None before it wrote any."""
    try:
        with open(path) as f:
            return Probes(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


class _Handler(exposition.MetricsHandler):
    probes: Probes = Probes()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/healthz", "/readyz"):
            probes = self.probes
            ok = probes.live if path == "/healthz" else probes.ready and probes.live
            body = b"ok\n" if ok else f"not {'live' if path == '/healthz' else 'ready'}: {probes.reason}\n".encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if path != "/metrics":
            self.send_error(404, "try /metrics, /healthz or /readyz")
            return
        super().do_GET()


def start_http_endpoint(
    host: str, port: int, probes: Probes, registry: CollectorRegistry | None = None
) -> ThreadingHTTPServer:
    """Serve ``/metrics`` (``registry``, by default the server's :data:`service.metrics.REGISTRY`), ``/healthz``
    and ``/readyz`` at ``http://host:port`` from a daemon thread; port 0 picks a free one
    (``server.server_address[1]``). Stop it with ``shutdown()`` and ``server_close()``.

    The ``--workers`` supervisor passes its own registry (the workers' metrics summed) and probes that follow
    its workers (:class:`service.workers.WorkerProbes`)."""
    if registry is None:
        from .metrics import REGISTRY  # not at import: the supervisor must not declare the workers' metrics

        registry = REGISTRY
    handler = type("PathGuardHTTPHandler", (_Handler,), {"probes": probes, "registry": registry})
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # "::" and IPv6 hosts too
    server_class = type("PathGuardHTTPServer", (ThreadingHTTPServer,), {"address_family": family})
    server = server_class((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pathguard-http", daemon=True).start()
    return server
