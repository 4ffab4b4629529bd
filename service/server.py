"""The gRPC server: services, health, reflection, TLS, metrics endpoint, readiness and graceful shutdown.

Lifecycle of :class:`PathGuardServer`:

1. :meth:`~PathGuardServer.start` binds the port and starts serving with health NOT_SERVING, then loads
   and warms up the bundle (in a worker thread) and only then turns health SERVING (KServe ServerReady
   and ModelReady follow the same state).
2. :meth:`~PathGuardServer.reload` loads a bundle next to the running one and swaps it in atomically
   (SIGHUP in ``pathguard serve``); a broken bundle is refused and the old model keeps serving.
3. :meth:`~PathGuardServer.stop` turns health NOT_SERVING, refuses new calls, gives accepted calls the
   grace period to finish, then stops the batcher and the metrics endpoint. It logs how many accepted
   calls finished during the drain and how many the end of the grace period cut off (normally none).

:func:`serve` runs it until SIGTERM/SIGINT (exit 0); :class:`BackgroundServer` runs it on a thread of
its own, for tests and benchmarks in one process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from detector import BundleError
from detector.runtime import set_threads

from . import metrics
from ._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from ._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc
from .config import ServeConfig
from .interceptors import ServiceInterceptor
from .runtime import ModelInfo
from .screening import Limits, ScreeningService
from .servicers import KSERVE_SERVICE, PATHGUARD_SERVICE, InferenceServicer, PathGuardServicer

log = logging.getLogger(__name__)

SERVICES = (PATHGUARD_SERVICE, KSERVE_SERVICE)
# PathGuard and KServe calls admitted at once beyond the batching queue (being decoded, open streams between
# requests): past this the interceptor answers RESOURCE_EXHAUSTED, which bounds the memory that decoded
# requests can take. Health and reflection are not counted, so probes stay answerable under any load.
EXTRA_CONCURRENT_RPCS = 64
# gRPC's own limit on concurrent calls of any kind sits this far above the admission limit: refused calls
# end at once, so it is only reached when that many arrive within a moment; probes answer below it.
PROBE_HEADROOM = 256


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS (and mTLS when ``tls_client_ca`` is set) credentials, or None for plaintext."""
    if not config.tls_cert:
        return None
    client_ca = _read(config.tls_client_ca)
    return grpc.ssl_server_credentials([(_read(config.tls_key), _read(config.tls_cert))],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


def read_token(path: str | None) -> str | None:
    if not path:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"auth_token_file={path!r} is empty")
    return token


class PathGuardServer:
    """One PathGuard server process's worth of state. Use from a single asyncio event loop."""

    def __init__(self, config: ServeConfig, *, worker: bool = False) -> None:
        """``worker``: one of several processes of ``pathguard serve --workers N`` (service.workers): the port is
        shared (SO_REUSEPORT) and the supervisor serves the metrics."""
        self.config = config.validate()
        self.worker = worker
        self.service = ScreeningService(Limits(
            max_batch_size=config.max_batch_size, max_queue_delay_ms=config.max_queue_delay_ms,
            max_queue_size=config.max_queue_size, max_images_per_request=config.max_images_per_request,
            engine=config.engine))
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: aio.Server | None = None
        self._interceptor: ServiceInterceptor | None = None
        self._metrics_http: ThreadingHTTPServer | None = None
        self._stopping = False

    async def start(self) -> ModelInfo:
        """Serve (NOT_SERVING), load and warm the bundle, then SERVING. Returns the loaded model's info."""
        cfg = self.config
        threads = set_threads(cfg.threads)
        token = read_token(cfg.auth_token_file)
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 1 if self.worker else 0)]
        max_active = cfg.max_queue_size + EXTRA_CONCURRENT_RPCS
        self._interceptor = ServiceInterceptor(SERVICES, token, max_active=max_active)
        server = aio.server(interceptors=[self._interceptor], options=options,
                            maximum_concurrent_rpcs=max_active + PROBE_HEADROOM)
        pb_grpc.add_PathGuardServicer_to_server(PathGuardServicer(self.service), server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.service), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{cfg.host}:{cfg.port}"
        credentials = server_credentials(cfg)
        self.port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if not self.worker:
            self._metrics_http = metrics.start_metrics_server(cfg.host, cfg.metrics_port)
            self.metrics_port = self._metrics_http.server_address[1]
        await server.start()
        self._server = server
        log.info("listening on %s:%d (%s%s), %s, %d torch threads; loading %s",
                 cfg.host, self.port, "mTLS" if cfg.tls_client_ca else "TLS" if credentials else "plaintext",
                 ", bearer token" if token else "",
                 "metrics from the supervisor" if self.worker else f"metrics on :{self.metrics_port}/metrics",
                 threads, cfg.bundle)
        if token and not credentials:
            log.warning("bearer-token auth without TLS sends the token in clear text")
        try:
            info = await asyncio.get_running_loop().run_in_executor(None, self.service.load, cfg.bundle)
        except BaseException:
            await self.stop(grace=0)
            raise
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: %s v%s", info.name, info.version)
        return info

    async def reload(self, path: str | None = None) -> ModelInfo | None:
        """Load ``path`` (default: the configured bundle) and swap it in; on failure keep the current model."""
        path = path or self.config.bundle
        start = time.perf_counter()
        try:
            info = await asyncio.get_running_loop().run_in_executor(None, self.service.reload, path)
        except (BundleError, OSError, ValueError) as exc:  # a broken bundle: its message names the file
            log.error("reload of %s failed: %s; still serving the previous model", path, exc)
        except Exception:
            log.exception("reload of %s failed; still serving the previous model", path)
        else:
            metrics.record_reload(time.perf_counter() - start, ok=True)
            return info
        metrics.record_reload(time.perf_counter() - start, ok=False)
        return None

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let accepted ones finish within ``grace`` seconds."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._drain(self._server, grace)
        await asyncio.get_running_loop().run_in_executor(None, self.service.close, grace)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")

    async def _drain(self, server: aio.Server, grace: float) -> None:
        calls = self._interceptor
        assert calls is not None  # set by start(), which _drain follows
        finished_before, start = calls.finished, time.monotonic()
        stopping = asyncio.ensure_future(server.stop(grace))
        await asyncio.sleep(0)  # the stop has begun: the port is closed and new calls are refused
        log.info("draining: new calls refused, %.1f s grace for %d calls in flight", grace, calls.active)
        done, _ = await asyncio.wait({stopping}, timeout=grace)
        # Calls still running when the grace period ends are cancelled by gRPC: cut off.
        finished, cut_off = calls.finished, 0 if done else calls.active
        await stopping
        (log.warning if cut_off else log.info)(
            "drained in %.2f s: %d accepted calls finished (%d since start), %d cut off at the end of the "
            "%.1f s grace period", time.monotonic() - start, finished - finished_before, finished, cut_off, grace)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICES):
            await self.health.set(name, status)


async def _serve(config: ServeConfig, worker: bool) -> None:
    server = PathGuardServer(config, worker=worker)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_signal(signum: int) -> None:
        log.info("received %s", signal.Signals(signum).name)
        done.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(server.reload()))
    start = asyncio.ensure_future(server.start())
    waiter = asyncio.ensure_future(done.wait())
    await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if start.done():
        start.result()  # raise a load failure
        await waiter
    else:
        start.cancel()
    await server.stop()


def serve(config: ServeConfig, worker: bool = False) -> int:
    """Run one server process until SIGTERM or SIGINT, then drain (``pathguard serve``). Returns the exit code.

    ``worker``: one of the processes of ``pathguard serve --workers N`` (:mod:`service.workers` runs N of them).
    """
    asyncio.run(_serve(config, worker))
    return 0


class BackgroundServer:
    """A :class:`PathGuardServer` on its own thread and event loop (tests, benchmarks). A context manager."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.server: PathGuardServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pathguard-server", daemon=True)

    def start(self) -> BackgroundServer:
        self._thread.start()
        self.server = PathGuardServer(self.config)
        try:
            self._call(self.server.start())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            raise
        return self

    def stop(self, grace: float | None = 0) -> None:
        if self.server is not None:
            self._call(self.server.stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def reload(self, path: str | None = None) -> ModelInfo | None:
        return self._call(self._started().reload(path))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self._started().port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self._started().metrics_port}/metrics"

    def _started(self) -> PathGuardServer:
        if self.server is None:
            raise RuntimeError("the server is not started; call start() first")
        return self.server

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
