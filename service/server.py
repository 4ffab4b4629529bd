"""The gRPC server: services, health, reflection, TLS, metrics endpoint, readiness and graceful shutdown.

Lifecycle of :class:`PathGuardServer`:

1. :meth:`~PathGuardServer.start` binds the port and starts serving with health NOT_SERVING, then loads
   and warms up the bundle (in a worker thread) and only then turns health SERVING (KServe ServerReady
   and ModelReady follow the same state).
2. :meth:`~PathGuardServer.reload` loads a bundle next to the running one and swaps it in atomically; a
   broken bundle is refused and the old model keeps serving. :meth:`~PathGuardServer.reload_credentials`
   re-reads the token file and the TLS certificates: new calls and new TLS handshakes use them, calls and
   connections already open go on. SIGHUP in ``pathguard serve`` does both.
3. A watchdog turns health NOT_SERVING while the batching worker makes no progress for
   ``watchdog_seconds`` (SERVING again once it does), and the ``liveness`` health service (and ``/healthz``)
   NOT_SERVING past ``liveness_seconds`` or when the worker thread is gone, so the liveness probe restarts a
   pod that cannot heal. Readiness is also served as ``/readyz`` beside ``/metrics``, in plaintext.
4. :meth:`~PathGuardServer.stop` turns health NOT_SERVING, refuses new calls, gives accepted calls the
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
from detector.bundle import read_meta
from detector.runtime import set_threads

from . import metrics
from ._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from ._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc
from .config import DEFAULT_MAX_MESSAGE_MB, ServeConfig
from .http_endpoint import Probes, start_http_endpoint, worker_probes
from .interceptors import RequestBudget, ServiceInterceptor
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
LIVENESS_SERVICE = "liveness"  # health service of the liveness probe; "" and SERVICES are readiness
# Server-side keepalive: ping an idle connection after this long, drop it when the ping is not answered.
KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS = 60_000, 20_000


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class ReloadableCredentials:
    """TLS (and mTLS when ``tls_client_ca`` is set) credentials whose files :meth:`reload` re-reads: every
    new handshake after it uses the new certificate; open connections keep theirs."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._read(), self._fetch, require_client_authentication=bool(config.tls_client_ca)
        )

    def _read(self) -> grpc.ServerCertificateConfiguration:
        cfg = self.config
        return grpc.ssl_server_certificate_configuration(
            [(_read(cfg.tls_key), _read(cfg.tls_cert))], root_certificates=_read(cfg.tls_client_ca)
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # gRPC asks before each handshake: a new configuration once after reload(), else None (unchanged).
        pending, self._pending = self._pending, None
        return pending

    def reload(self) -> None:
        """Read the certificate files again (raises OSError/ValueError when they are unreadable)."""
        self._pending = self._read()


def read_tokens(path: str | None) -> list[str]:
    """Bearer tokens from ``path``, one a line (blank lines and ``#`` comments skipped); none without a path.

    Two lines during a rotation: callers holding either token are let in while they switch."""
    if not path:
        return []
    tokens = [line.strip() for line in Path(path).read_text().splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise ValueError(f"auth_token_file={path!r} holds no token")
    return tokens


def request_budget(config: ServeConfig, input_shape: tuple[int, int, int]) -> RequestBudget:
    """The memory budget of the requests in flight: ``max_request_memory_mb``, each message charged for its
    copies and for the decoded float32 images of a largest request (see :class:`RequestBudget`)."""
    c, h, w = input_shape
    return RequestBudget(config.max_request_memory_mb << 20, config.max_images_per_request * c * h * w * 4)


def request_memory_bound(config: ServeConfig, input_shape: tuple[int, int, int]) -> int:
    """Most bytes that requests can hold in the server at once, on top of its resident memory when idle:
    the budget of parsed requests (or one largest request, which is always taken) plus as much again for
    messages still being received (the open-call limit keeps those within the budget)."""
    budget = request_budget(config, input_shape)
    return 2 * max(budget.limit, budget.COPIES * config.receive_limit(input_shape) + budget.decoded)


def grpc_options(config: ServeConfig, receive_limit: int, reuseport: bool = False) -> list[tuple[str, int]]:
    """Channel arguments of the server: message limits, connection age, keepalive and its enforcement;
    ``reuseport`` for the workers of ``--workers N``, which share one port."""
    options = [
        ("grpc.max_receive_message_length", receive_limit),
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_MB << 20),
        ("grpc.so_reuseport", 1 if reuseport else 0),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.keepalive_min_interval * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace * 1000)),
        ]
    return options


class PathGuardServer:
    """One PathGuard server process's worth of state. Use from a single asyncio event loop."""

    def __init__(self, config: ServeConfig, *, worker: bool = False) -> None:
        """``worker``: one of several processes of ``pathguard serve --workers N`` (service.workers): the port is
        shared (SO_REUSEPORT) and the supervisor serves the metrics."""
        self.config = config.validate()
        self.worker = worker
        self.service = ScreeningService(
            Limits(
                max_batch_size=config.max_batch_size,
                max_queue_delay_ms=config.max_queue_delay_ms,
                max_queue_size=config.max_queue_size,
                max_queue_images=config.max_queue_images,
                max_images_per_request=config.max_images_per_request,
                engine=config.engine,
                model_name=config.model_name,
                score_policy=config.score_policy,
            )
        )
        self.health = health.aio.HealthServicer()
        self.probes = worker_probes() if worker else Probes()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.receive_limit: int | None = None
        self._server: aio.Server | None = None
        self._interceptor: ServiceInterceptor | None = None
        self._credentials: ReloadableCredentials | None = None
        self._metrics_http: ThreadingHTTPServer | None = None
        self._watchdog: asyncio.Task | None = None
        self._stopping = False

    def _bind(self, tokens: list[str], input_shape: tuple[int, int, int]) -> aio.Server:
        """The gRPC server with its limits, interceptor and servicers, bound to its port (not started yet)."""
        cfg = self.config
        self.receive_limit = cfg.receive_limit(input_shape)
        max_active = cfg.max_queue_size + EXTRA_CONCURRENT_RPCS
        budget = request_budget(cfg, input_shape)
        # messages being received are not charged yet: at most as many at once as fit the budget twice
        # (their wire bytes, then their Python copy)
        max_open = max(1, budget.limit // (2 * self.receive_limit))
        self._interceptor = ServiceInterceptor(
            SERVICES, tokens, max_active=max_active, budget=budget, max_open=max_open
        )
        options = grpc_options(cfg, self.receive_limit, reuseport=self.worker)
        server = aio.server(
            interceptors=[self._interceptor], options=options, maximum_concurrent_rpcs=max_active + PROBE_HEADROOM
        )
        pb_grpc.add_PathGuardServicer_to_server(PathGuardServicer(self.service), server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.service), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            self._credentials = ReloadableCredentials(cfg)
            self.port = server.add_secure_port(address, self._credentials.credentials)
        else:
            self.port = server.add_insecure_port(address)
        return server

    async def start(self) -> ModelInfo:
        """Serve (NOT_SERVING), load and warm the bundle, then SERVING. Returns the loaded model's info."""
        cfg = self.config
        threads = set_threads(cfg.threads)
        tokens = read_tokens(cfg.auth_token_file)
        # The receive limit is fixed when the port opens: derive it from the bundle's declared input shape.
        input_shape = tuple(read_meta(cfg.bundle)["input_shape"])
        server = self._bind(tokens, input_shape)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if not self.worker:  # a worker's metrics and probes are served by the supervisor (service.workers)
            self._metrics_http = start_http_endpoint(cfg.host, cfg.metrics_port, self.probes)
            self.metrics_port = self._metrics_http.server_address[1]
        await server.start()
        self._server = server
        log.info(
            "listening on %s:%d (%s%s), %s, %d torch threads, "
            "requests up to %d bytes (all requests in flight: at most %.0f MiB); loading %s",
            cfg.host,
            self.port,
            "mTLS" if cfg.tls_client_ca else "TLS" if cfg.tls_cert else "plaintext",
            f", {len(tokens)} bearer token(s)" if tokens else "",
            "metrics and probes from the supervisor"
            if self.worker
            else f"metrics on :{self.metrics_port}/metrics (probes /healthz, /readyz)",
            threads,
            self.receive_limit,
            request_memory_bound(cfg, input_shape) / 2**20,
            cfg.bundle,
        )
        if tokens and not cfg.tls_cert:
            log.warning("bearer-token auth without TLS sends the token in clear text")
        try:
            info = await asyncio.get_running_loop().run_in_executor(None, self.service.load, cfg.bundle)
        except BaseException:
            await self.stop(grace=0)
            raise
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.probes.ready, self.probes.reason = True, "serving"
        self._watchdog = asyncio.ensure_future(self._watch())
        log.info("ready: %s v%s", info.name, info.version)
        return info

    async def reload_credentials(self) -> bool:
        """Re-read the token file and the TLS certificate files; on failure keep the current ones."""
        cfg = self.config
        try:
            tokens = read_tokens(cfg.auth_token_file)
            if self._credentials is not None:
                self._credentials.reload()
        except (OSError, ValueError) as exc:
            log.error("re-reading credentials failed: %s; keeping the current ones", exc)
            return False
        if self._interceptor is not None and cfg.auth_token_file:
            self._interceptor.set_tokens(tokens)
        log.info(
            "credentials re-read: %d bearer token(s)%s",
            len(tokens),
            ", TLS certificates (for new connections)" if self._credentials else "",
        )
        return True

    async def _watch(self) -> None:
        """The watchdog: readiness and liveness follow the batching worker's progress."""
        cfg, batcher = self.config, self.service.batcher
        period = min(1.0, cfg.watchdog_seconds / 4)
        ready = live = True
        while not self._stopping:
            await asyncio.sleep(period)
            stalled, alive = batcher.stalled_for(), batcher.alive
            now_ready, now_live = alive and stalled < cfg.watchdog_seconds, alive and stalled < cfg.liveness_seconds
            if self._stopping:
                return
            if now_ready != ready:
                reason = (
                    "serving"
                    if now_ready
                    else (
                        f"the batching worker has made no progress for {stalled:.1f} s"
                        if alive
                        else "the batching worker is gone"
                    )
                )
                (log.info if now_ready else log.error)(
                    "watchdog: %s; health %s", reason, "SERVING" if now_ready else "NOT_SERVING"
                )
                self.probes.ready, self.probes.reason = now_ready, reason
                await self._set_health(
                    health_pb2.HealthCheckResponse.SERVING if now_ready else health_pb2.HealthCheckResponse.NOT_SERVING
                )
            if now_live != live:
                (log.info if now_live else log.error)(
                    "watchdog: liveness %s", "SERVING" if now_live else "NOT_SERVING: the pod needs a restart"
                )
                self.probes.live = now_live
                await self.health.set(
                    LIVENESS_SERVICE,
                    health_pb2.HealthCheckResponse.SERVING if now_live else health_pb2.HealthCheckResponse.NOT_SERVING,
                )
            ready, live = now_ready, now_live

    async def reload(self, path: str | None = None) -> ModelInfo | None:
        """Load ``path`` (default: the configured bundle) and swap it in; on failure keep the current model."""
        path = path or self.config.bundle
        start = time.perf_counter()
        was = f"v{self.service.info.version}" if self.service.ready else "no model"
        try:
            info = await asyncio.get_running_loop().run_in_executor(None, self.service.reload, path)
        except (BundleError, OSError, ValueError) as exc:  # a broken bundle: its message names the file
            metrics.record_reload(time.perf_counter() - start, ok=False)
            log.error("reload of %s failed: %s; still serving the previous model", path, exc)
        except Exception:
            metrics.record_reload(time.perf_counter() - start, ok=False)
            log.exception("reload of %s failed; still serving the previous model", path)
        else:
            # the metric first: whoever reads the log line and then scrapes /metrics sees the reload counted
            metrics.record_reload(time.perf_counter() - start, ok=True)
            log.info("reloaded: now serving %s v%s from %s (was %s)", info.name, info.version, path, was)
            return info
        return None

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let accepted ones finish within ``grace`` seconds."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.config.grace_period if grace is None else grace
        self.probes.ready, self.probes.reason = False, "shutting down"
        if self._watchdog is not None:
            self._watchdog.cancel()
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
            "%.1f s grace period",
            time.monotonic() - start,
            finished - finished_before,
            finished,
            cut_off,
            grace,
        )

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

    async def on_hangup() -> None:
        await server.reload_credentials()
        await server.reload()

    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(on_hangup()))
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

    def reload_credentials(self) -> bool:
        return self._call(self._started().reload_credentials())

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
