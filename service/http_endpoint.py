"""The service's plaintext HTTP port: Prometheus ``/metrics`` and the probes ``/healthz`` and ``/readyz``.

The probes answer 200 ``ok`` or 503 with the reason, from :class:`Probes`, which the server keeps in step
with its gRPC health services (``liveness`` for ``/healthz``, the server's readiness for ``/readyz``). They
exist so that Kubernetes' probes work when gRPC is served with TLS: the kubelet's gRPC probe speaks
plaintext only. Like the metrics, they carry no secret and need no token.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from prometheus_client import exposition

from .metrics import REGISTRY


@dataclass
class Probes:
    """What the probes report; the server sets it, the HTTP thread reads it (plain attribute writes)."""

    live: bool = True
    ready: bool = False
    reason: str = "starting"


class _Handler(exposition.MetricsHandler):
    registry = REGISTRY
    probes = Probes()

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


def start_http_endpoint(host: str, port: int, probes: Probes) -> ThreadingHTTPServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` at ``http://host:port`` from a daemon thread; port 0
    picks a free one (``server.server_address[1]``). Stop it with ``shutdown()`` and ``server_close()``."""
    handler = type("PathGuardHTTPHandler", (_Handler,), {"probes": probes})
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # "::" and IPv6 hosts too
    server_class = type("PathGuardHTTPServer", (ThreadingHTTPServer,), {"address_family": family})
    server = server_class((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pathguard-http", daemon=True).start()
    return server
