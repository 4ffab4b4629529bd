"""Load generator for a PathGuard server: concurrent callers over gRPC, faults on cue, every call accounted for.

``--callers`` asyncio callers (grpc.aio, one channel) send requests back to back for ``--duration`` seconds:
PathGuard's own API (raw tensors, some PNG-encoded) and the KServe v2 protocol, with a share of
deliberately invalid requests. The report (JSON) holds throughput, latency percentiles, counts by status
code, the server's resident memory over time, health-probe answers during the load and the accounting:

* every call ends in an **expected** outcome -- valid requests OK, invalid ones INVALID_ARGUMENT,
  RESOURCE_EXHAUSTED past the queue bound (deliberate back-pressure), UNAVAILABLE once SIGTERM was sent (new
  calls refused; CANCELLED, from gRPC itself, for a call that had arrived but was not yet dispatched to a
  handler when the port closed) -- or it is counted as an **error** (kept with its message);
* **accepted** calls are those the server admitted; the server reports how many it finished (its
  ``/metrics`` while it runs, its drain log line after SIGTERM) and how many the grace period cut off.
  ``lost`` = accepted calls whose answer the callers did not get: it must be 0.
* responses are checked for **label consistency**: for one input and one model version the answer
  (class index and name) never changes, so a reload that mixed one bundle's predictions with another's
  labels would show.

The server is either started here (``--bundle``: ``pathguard serve`` in a subprocess on loopback; its
``--bundle`` is a symlink so that ``--reload-bundle`` can swap the bundle under it) or given
(``--target``, ``--metrics-url``, ``--server-pid`` for signals and memory). A reload is SIGHUP; the server
answers it in its log (``reloaded: ...`` or ``reload of ... failed: <reason>``), which the report quotes.

    export OMP_WAIT_POLICY=PASSIVE
    .venv/bin/python -m bench.load --bundle models/default --threads 1 --callers 64 --duration 60 --json load.json
    # SIGTERM after 20 s: accepted calls must all finish and the server must exit 0
    .venv/bin/python -m bench.load --bundle models/default --callers 64 --duration 30 --sigterm-at 20
    # reloads after 10 and 20 s (SIGHUP), first to another bundle, then back
    .venv/bin/python -m bench.load --bundle models/default --callers 64 --duration 30 --reload-at 10 20 \\
        --reload-bundle /tmp/other-bundle models/default
    # a running server
    .venv/bin/python -m bench.load --target 127.0.0.1:50051 --metrics-url http://127.0.0.1:8002/metrics

Exit code 0 when there were no errors, no lost calls and (with ``--max-rss-growth``) memory grew less
than that fraction; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service._proto.pathguard.v1 import pathguard_pb2 as pb
from service._proto.pathguard.v1 import pathguard_pb2_grpc as pb_grpc
from service.codec import encode_png

from .helpers import (
    CHANNEL_OPTIONS,
    ServerProcess,
    kserve_request,
    mb,
    ms,
    own_request,
    percentile,
    random_images,
    rss_bytes,
    scrape,
)

log = logging.getLogger("load")

OWN_METHODS = ("pathguard.v1.PathGuard/ScreenImages", "pathguard.v1.PathGuard/DescribeModel")
KSERVE_METHOD = "inference.GRPCInferenceService/ModelInfer"
# Messages of calls the server refused before admitting them (not its answers to accepted calls).
_NOT_ADMITTED = ("too many concurrent calls", "Concurrent RPC limit exceeded", "Received message larger than max")
_APP_UNAVAILABLE = ("the server is shutting down", "the model is still loading", "no model is loaded yet")


@dataclass
class LoadConfig:
    """What to load, how hard, and which faults to inject when (seconds from the start of the load)."""

    target: str | None = None  # HOST:PORT of a running server; None: start one from ``bundle``
    bundle: str | None = None  # bundle to serve (``pathguard serve`` in a subprocess)
    threads: int = 1  # torch threads of the started server
    server_args: list[str] = field(default_factory=list)  # more `pathguard serve` flags
    metrics_url: str | None = None  # of a given server (a started one is known)
    server_pid: int | None = None  # of a given server: signals and /proc memory
    callers: int = 64
    duration: float = 60.0
    kserve_fraction: float = 0.3  # share of calls over KServe v2 (the rest: own API)
    encoded_fraction: float = 0.2  # share of valid own-API calls sent as PNG files
    invalid_fraction: float = 0.1  # share of deliberately invalid requests
    images_per_request: int = 1
    timeout: float = 30.0  # per call; 30 s is far above any queueing here, so a deadline is an error
    warmup: float = 5.0  # memory "after warm-up" is read this long into the load
    sigterm_at: float | None = None
    reload_at: list[float] = field(default_factory=list)
    reload_bundles: list[str] = field(default_factory=list)  # the i-th reload first moves the bundle symlink here
    health_interval: float = 0.5
    seed: int = 0
    token_file: str | None = None


# ----------------------------------------------------------------------------------------------------
# what the server says
# ----------------------------------------------------------------------------------------------------
def answered_by_server(metrics: dict[str, float]) -> int:
    """Calls of the PathGuard and KServe services the server has answered (``pathguard_requests_total``)."""
    return int(sum(v for k, v in metrics.items() if k.startswith("pathguard_requests_total{")))


def parse_drain(log_text: str) -> dict | None:
    match = re.search(
        r"drained in ([\d.]+) s: (\d+) accepted calls finished \((\d+) since start\), (\d+) cut off", log_text
    )
    if match is None:
        return None
    return {
        "seconds": float(match[1]),
        "finished_during_drain": int(match[2]),
        "finished_since_start": int(match[3]),
        "cut_off": int(match[4]),
    }


# ----------------------------------------------------------------------------------------------------
# requests
# ----------------------------------------------------------------------------------------------------
@dataclass
class Request:
    api: str  # "own" or "kserve"
    kind: str  # "tensor", "png", "invalid:<what>"
    key: int  # which input (for label consistency)
    message: object

    @property
    def valid(self) -> bool:
        return not self.kind.startswith("invalid")


def build_requests(images: np.ndarray, model: str, per_request: int) -> dict[str, list[Request]]:
    """Pools of valid requests (own tensor, own PNG, KServe) and of invalid ones, from images (N, C, H, W)."""
    n = len(images) // per_request
    groups = [np.ascontiguousarray(images[i * per_request : (i + 1) * per_request], dtype=np.float32) for i in range(n)]
    c, h, w = images.shape[1:]
    pools: dict[str, list[Request]] = {
        "own": [Request("own", "tensor", i, own_request(g)) for i, g in enumerate(groups)],
        "kserve": [Request("kserve", "tensor", i, kserve_request(g, model)) for i, g in enumerate(groups)],
        "png": [],
    }
    if c in (1, 3):
        pools["png"] = [
            Request("own", "png", i, pb.ScreenRequest(encoded=pb.EncodedImages(images=[encode_png(img) for img in g])))
            for i, g in enumerate(groups)
        ]
    one = groups[0]
    nan = one.copy()
    nan.flat[0] = np.nan
    wrong = np.zeros((len(one), c, h + 1, w), np.float32)
    pools["invalid_own"] = [
        Request("own", "invalid:nan", -1, own_request(nan)),
        Request("own", "invalid:shape", -1, own_request(wrong)),
        Request(
            "own",
            "invalid:bytes",
            -1,
            pb.ScreenRequest(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=list(one.shape), data=one.tobytes()[:-3])),
        ),
        Request("own", "invalid:png", -1, pb.ScreenRequest(encoded=pb.EncodedImages(images=[b"\x89PNG\r\n junk"]))),
        Request("own", "invalid:empty", -1, pb.ScreenRequest()),
    ]
    pools["invalid_kserve"] = [
        Request("kserve", "invalid:datatype", -1, kserve_request(one, model, datatype="INT32")),
        Request("kserve", "invalid:name", -1, kserve_request(one, model, name="input__0")),
        Request("kserve", "invalid:bytes", -1, kserve_request(one, model, raw=one.tobytes()[:-1])),
        Request("kserve", "invalid:range", -1, kserve_request(one * 0 + 2.0, model)),
    ]
    return pools


# ----------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------
class Tally:
    """Every call's outcome, aggregated as it happens (the load runs on one event loop: no locks)."""

    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self.by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        self.latencies_ok: list[float] = []
        self.errors: Counter[tuple[str, str, str]] = Counter()
        self.unavailable: Counter[str] = Counter()
        self.admitted_answers = 0  # answers to calls the server admitted (as seen by the callers)
        self.app_answers = 0  # answers from the server's handlers: admitted calls + refusals at admission
        self.images_ok = 0
        self.versions: dict[str, dict] = {}  # version -> OK calls and when the first/last were sent and answered
        self.answers: dict[tuple[str, str, int, str], set] = defaultdict(set)
        self.ok_after_reload: Counter[str] = Counter()

    def record(
        self,
        req: Request,
        code: grpc.StatusCode,
        details: str,
        sent: float,
        answered: float,
        response,
        sigterm_sent: bool,
    ) -> None:
        """One call: sent and answered in seconds since the start of the load."""
        name = code.name
        self.codes[name] += 1
        self.by_kind[f"{req.api}/{req.kind.split(':')[0]}"][name] += 1
        admitted = code is grpc.StatusCode.OK or not details.startswith(_NOT_ADMITTED)
        if code is grpc.StatusCode.UNAVAILABLE:
            admitted = details.startswith(_APP_UNAVAILABLE)
            self.unavailable[_shorten(details)] += 1
        if code is grpc.StatusCode.CANCELLED:
            admitted = False  # refused at shutdown, or cut off (the server counts those as cut off)
        self.admitted_answers += admitted
        self.app_answers += admitted or details.startswith(_NOT_ADMITTED[0])
        # After SIGTERM new calls are refused: UNAVAILABLE, or CANCELLED for one that reached the transport
        # just as it shut down (the callers never cancel). The accounting tells these from lost accepted calls.
        expected = (
            (code is grpc.StatusCode.OK and req.valid)
            or (code is grpc.StatusCode.INVALID_ARGUMENT and not req.valid)
            or code is grpc.StatusCode.RESOURCE_EXHAUSTED
            or (code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and sigterm_sent)
        )
        if not expected:
            self.errors[(req.api, req.kind, f"{name}: {_shorten(details)}")] += 1
        if code is grpc.StatusCode.OK and req.valid:
            self.latencies_ok.append(answered - sent)
            version, answers = _answers(req, response)
            self.images_ok += len(answers)
            seen = self.versions.setdefault(
                version,
                {
                    "ok_calls": 0,
                    "first_sent_s": sent,
                    "last_sent_s": sent,
                    "first_answer_s": answered,
                    "last_answer_s": answered,
                },
            )
            seen["ok_calls"] += 1
            seen["first_sent_s"], seen["last_sent_s"] = min(seen["first_sent_s"], sent), max(seen["last_sent_s"], sent)
            seen["first_answer_s"] = min(seen["first_answer_s"], answered)
            seen["last_answer_s"] = max(seen["last_answer_s"], answered)
            self.answers[(req.api, req.kind, req.key, version)].add(answers)


def _shorten(details: str, limit: int = 160) -> str:
    details = re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "HOST:PORT", details or "")
    return details if len(details) <= limit else details[:limit] + "..."


def _answers(req: Request, response) -> tuple[str, tuple]:
    """(model version, per-image answers) of a successful response."""
    if req.api == "own":
        return response.model_version, tuple((r.class_index, r.class_name) for r in response.results)
    names = [o.name for o in response.outputs]
    raw = response.raw_output_contents[names.index("predicted_class")]
    return response.model_version, tuple((int(c), "") for c in np.frombuffer(raw, dtype="<i8"))


async def _health_probe(
    channel: aio.Channel, until: float, interval: float, stats: dict, sigterm: asyncio.Event
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < until and not sigterm.is_set():
        t = time.perf_counter()
        try:
            status = (await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)).status
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as exc:
            name = exc.code().name
        if not sigterm.is_set():
            stats["answers"][name] += 1
            stats["latencies"].append(time.perf_counter() - t)
        await asyncio.sleep(interval)


async def run_load(cfg: LoadConfig, images: np.ndarray | None = None) -> dict:
    """Run the load described by ``cfg`` and return the report (see the module docstring)."""
    server = ServerProcess(cfg.bundle, cfg.threads, cfg.server_args) if cfg.target is None else None
    try:
        run = LoadRun(cfg, server)
        async with aio.insecure_channel(run.target, options=CHANNEL_OPTIONS) as channel:
            pools = await run.setup(channel, images)
            await run.drive(channel, pools)
        await asyncio.get_running_loop().run_in_executor(None, run.wait_for_exit)
        return run.report(run.accounting())
    finally:
        if server is not None:
            server.kill()


class LoadRun:
    """One load run in four steps: :meth:`setup` (describe the model, build the requests, baseline scrape),
    :meth:`drive` (callers, memory sampler, faults and health probe until ``duration``), :meth:`accounting`
    (what the server answered vs. what the callers got) and :meth:`report`."""

    def __init__(self, cfg: LoadConfig, server: ServerProcess | None) -> None:
        self.cfg, self.server = cfg, server
        self.target = server.target if server else cfg.target
        self.metrics_url = server.metrics_url if server else cfg.metrics_url
        self.pid = server.pid if server else cfg.server_pid
        self.metadata: tuple = ()
        if cfg.token_file:
            self.metadata = (("authorization", f"Bearer {Path(cfg.token_file).read_text().strip()}"),)
        self.tally, self.sigterm = Tally(), asyncio.Event()
        self.events: list[dict] = []
        self.rss_timeline: list[tuple[float, int]] = []
        self.rss: dict[str, int | None] = {}
        self.health: dict = {"answers": Counter(), "latencies": []}
        self.baseline: dict[str, float] = {}
        self.final: dict[str, float] = {}
        self.exit_code: int | str | None = None
        self.drain: dict | None = None

    def memory(self) -> int | None:
        if self.pid is not None:
            return rss_bytes(self.pid)
        if self.metrics_url:
            try:
                return int(scrape(self.metrics_url, timeout=5).get("process_resident_memory_bytes", 0)) or None
            except OSError:
                return None
        return None

    # -- setup ---------------------------------------------------------------------------------------------
    async def setup(self, channel: aio.Channel, images: np.ndarray | None) -> dict[str, list[Request]]:
        stub = pb_grpc.PathGuardStub(channel)
        self.described = await stub.DescribeModel(pb.DescribeModelRequest(), timeout=30, metadata=self.metadata)
        self.shape = tuple(self.described.input_shape)
        if images is None:
            images = random_images(self.shape, 32 * self.cfg.images_per_request, self.cfg.seed)
        self.baseline = scrape(self.metrics_url, timeout=5) if self.metrics_url else {}
        return build_requests(images, self.described.name, self.cfg.images_per_request)

    # -- drive ---------------------------------------------------------------------------------------------
    async def drive(self, channel: aio.Channel, pools: dict[str, list[Request]]) -> None:
        cfg = self.cfg
        self.rss["start"] = self.memory()
        self.t0 = time.monotonic()
        self.until = self.t0 + cfg.duration
        callers = [asyncio.ensure_future(self._caller(i, channel, pools)) for i in range(cfg.callers)]
        helpers = [
            asyncio.ensure_future(self._sample_memory()),
            asyncio.ensure_future(self._faults()),
            asyncio.ensure_future(_health_probe(channel, self.until, cfg.health_interval, self.health, self.sigterm)),
        ]
        await asyncio.sleep(min(cfg.warmup, cfg.duration))
        self.rss["warm"] = self.memory()
        await asyncio.gather(*callers)
        self.elapsed = time.monotonic() - self.t0
        self.rss["end"] = self.memory()
        self.final = scrape(self.metrics_url, timeout=5) if self.metrics_url and not self.sigterm.is_set() else {}
        for h in helpers:
            h.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)

    def _pick(self, rng: random.Random, pools: dict[str, list[Request]]) -> Request:
        api = "kserve" if rng.random() < self.cfg.kserve_fraction else "own"
        if rng.random() < self.cfg.invalid_fraction:
            return rng.choice(pools[f"invalid_{api}"])
        if api == "own" and pools["png"] and rng.random() < self.cfg.encoded_fraction:
            return rng.choice(pools["png"])
        return rng.choice(pools[api])

    async def _caller(self, i: int, channel: aio.Channel, pools: dict[str, list[Request]]) -> None:
        own, kserve = pb_grpc.PathGuardStub(channel), kserve_grpc.GRPCInferenceServiceStub(channel)
        rng = random.Random(self.cfg.seed * 1000 + i)
        while time.monotonic() < self.until:
            req = self._pick(rng, pools)
            call = own.ScreenImages if req.api == "own" else kserve.ModelInfer
            sent = time.monotonic() - self.t0
            try:
                response = await call(req.message, timeout=self.cfg.timeout, metadata=self.metadata)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                response, code, details = None, exc.code(), exc.details() or ""
            self.tally.record(req, code, details, sent, time.monotonic() - self.t0, response, self.sigterm.is_set())
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                await asyncio.sleep(0.005)  # back off a little, as a well-behaved client would
            elif code is grpc.StatusCode.UNAVAILABLE:
                await asyncio.sleep(0.05)

    async def _sample_memory(self) -> None:
        while time.monotonic() < self.until:
            value = await asyncio.get_running_loop().run_in_executor(None, self.memory)
            if value:
                self.rss_timeline.append((round(time.monotonic() - self.t0, 2), value))
            await asyncio.sleep(1.0)

    async def _faults(self) -> None:
        cfg = self.cfg
        schedule = sorted(
            [(t, "reload") for t in cfg.reload_at]
            + ([(cfg.sigterm_at, "sigterm")] if cfg.sigterm_at is not None else [])
        )
        reloads = 0
        for at, what in schedule:
            await asyncio.sleep(max(0.0, self.t0 + at - time.monotonic()))
            if what == "sigterm":
                self.events.append(await _sigterm(self.pid, self.sigterm, self.t0))
            else:
                bundle = cfg.reload_bundles[reloads] if reloads < len(cfg.reload_bundles) else None
                self.events.append(await _reload(self.server, self.pid, bundle, self.t0))
                reloads += 1

    def wait_for_exit(self) -> None:
        """After a SIGTERM, the started server's exit code and its drain log line."""
        if not self.sigterm.is_set() or self.server is None:
            return
        try:
            self.exit_code = self.server.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.exit_code = "still running after 120 s"
        self.drain = parse_drain(self.server.log)

    # -- accounting ----------------------------------------------------------------------------------------
    def accounting(self) -> dict:
        """What the server says it answered vs. the answers the callers got. After SIGTERM the drain log
        counts the calls it admitted (+1: our DescribeModel); while it runs, /metrics counts every answer of
        its handlers (admitted calls and refusals at admission) since our baseline scrape."""
        tally, drain = self.tally, self.drain
        if drain is not None:
            accepted, answers = drain["finished_since_start"] + drain["cut_off"], tally.admitted_answers + 1
            source = "server drain log (admitted calls)"
        elif self.final:
            accepted = answered_by_server(self.final) - answered_by_server(self.baseline)
            answers, source = tally.app_answers, "server /metrics (pathguard_requests_total)"
        else:
            accepted, answers, source = None, tally.admitted_answers, "unknown (no metrics, no drain log)"
        lost = None if accepted is None else max(0, accepted - answers)  # cut-off calls: accepted, unanswered
        return {
            "source": source,
            "answered_by_server": accepted,
            "answered_to_callers": answers,
            "cut_off": drain["cut_off"] if drain else None,
            "lost": lost,
        }

    # -- report --------------------------------------------------------------------------------------------
    def report(self, accounting: dict) -> dict:
        tally, d, elapsed = self.tally, self.described, self.elapsed
        inconsistent = {
            f"{api}/{kind}/input{key}/v{version}": sorted(map(list, seen))
            for (api, kind, key, version), seen in tally.answers.items()
            if len(seen) > 1
        }
        start, warm, end = self.rss.get("start"), self.rss.get("warm"), self.rss.get("end")
        rss = {
            "start_mb": mb(start),
            "after_warmup_mb": mb(warm),
            "end_mb": mb(end),
            "max_mb": mb(max((v for _, v in self.rss_timeline), default=None)),
            "growth_from_start": _growth(start, end),
            "growth_after_warmup": _growth(warm, end),
            "timeline_mb": [(t, mb(v)) for t, v in self.rss_timeline],
        }
        return {
            "config": asdict(self.cfg),
            "target": self.target,
            "model": {"name": d.name, "version": d.version, "arch": d.arch, "input_shape": list(self.shape)},
            "elapsed_s": round(elapsed, 2),
            "calls": sum(tally.codes.values()),
            "throughput_ok_per_s": round(tally.codes.get("OK", 0) / elapsed, 1),
            "images_ok_per_s": round(tally.images_ok / elapsed, 1),
            "latency_ok_ms": {
                name: ms(percentile(tally.latencies_ok, q))
                for name, q in (("p50", 50), ("p99", 99), ("p99.9", 99.9), ("max", 100))
            },
            "codes": dict(tally.codes),
            "codes_by_kind": {k: dict(v) for k, v in sorted(tally.by_kind.items())},
            "errors": {
                "count": sum(tally.errors.values()),
                "kinds": [
                    {"api": a, "kind": k, "outcome": m, "count": n} for (a, k, m), n in tally.errors.most_common(20)
                ],
            },
            "unavailable_details": dict(tally.unavailable.most_common(10)),
            "accounting": accounting,
            "server": {
                "pid": self.pid,
                "started_here": self.server is not None,
                "exit_code": self.exit_code,
                "drain": self.drain,
            },
            "events": self.events,
            "model_versions": {v: {k: round(x, 3) for k, x in seen.items()} for v, seen in tally.versions.items()},
            "label_inconsistencies": inconsistent,
            "health": {
                "answers": dict(self.health["answers"]),
                "p99_ms": ms(percentile(self.health["latencies"], 99)),
                "max_ms": ms(max(self.health["latencies"], default=None)),
            },
            "rss": rss,
        }


async def _sigterm(pid: int | None, flag: asyncio.Event, t0: float) -> dict:
    if pid is None:
        raise ValueError("--sigterm-at needs a server started here or --server-pid")
    os.kill(pid, signal.SIGTERM)
    flag.set()
    return {"event": "sigterm", "at_s": round(time.monotonic() - t0, 2)}


async def _reload(server: ServerProcess | None, pid: int | None, bundle: str | None, t0: float) -> dict:
    """SIGHUP (after moving the bundle symlink to ``bundle``); waits for the server's verdict in its log."""
    if pid is None:
        raise ValueError("--reload-at needs a server started here or --server-pid")
    event = {"event": "reload", "at_s": round(time.monotonic() - t0, 2), "bundle": bundle}
    mark = len(server.lines) if server else 0
    if bundle is not None:
        if server is None:
            raise ValueError("--reload-bundle needs a server started here (its bundle is a symlink we own)")
        server.point_to(bundle)
    os.kill(pid, signal.SIGHUP)
    if server is None:
        return event
    start = time.monotonic()
    while time.monotonic() - start < 120:
        line = server.find("reloaded:", mark) or server.find("reload of", mark)
        if line:
            event.update(
                ok="reloaded:" in line,
                seconds=round(time.monotonic() - start, 2),
                done_s=round(time.monotonic() - t0, 3),
                log=line.strip()[-1000:],
            )
            return event
        await asyncio.sleep(0.05)
    event.update(ok=False, log="no reload verdict in the server log within 120 s")
    return event


def _growth(before: int | None, after: int | None) -> float | None:
    return None if not before or not after else round(after / before - 1, 4)


def verdict(report: dict, max_rss_growth: float | None = None) -> dict[str, bool]:
    """The pass/fail reading of a report: no errors, nothing lost, labels consistent, memory bounded."""
    out = {
        "no_errors": report["errors"]["count"] == 0,
        "nothing_lost": report["accounting"]["lost"] == 0,
        "labels_consistent": not report["label_inconsistencies"],
        "reloads_ok": all(e.get("ok", True) for e in report["events"] if e["event"] == "reload"),
    }
    if report["server"]["drain"] is not None or report["server"]["exit_code"] is not None:
        out["exit_0"] = report["server"]["exit_code"] == 0
    if max_rss_growth is not None:
        growth = report["rss"]["growth_after_warmup"]
        out["rss_growth_ok"] = growth is not None and growth < max_rss_growth
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", help="start `pathguard serve` on this bundle (loopback, free ports)")
    where.add_argument("--target", help="HOST:PORT of a running server")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the started server")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        dest="server_args",
        metavar="ARG",
        help="extra `pathguard serve` argument, repeatable (e.g. --server-arg=--max-queue-size=64)",
    )
    p.add_argument("--metrics-url", help="/metrics of a running server")
    p.add_argument("--server-pid", type=int, help="pid of a running server (signals, /proc memory)")
    p.add_argument("--token-file", help="bearer token to send")
    defaults = LoadConfig()
    for name in (
        "callers",
        "duration",
        "kserve_fraction",
        "encoded_fraction",
        "invalid_fraction",
        "images_per_request",
        "timeout",
        "warmup",
        "health_interval",
        "seed",
    ):
        value = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"default {value}")
    p.add_argument("--sigterm-at", type=float, help="send SIGTERM this many seconds into the load")
    p.add_argument("--reload-at", type=float, nargs="+", default=[], help="send SIGHUP at these seconds")
    p.add_argument(
        "--reload-bundle",
        nargs="+",
        default=[],
        dest="reload_bundles",
        metavar="BUNDLE",
        help="bundles the reloads switch to, in order (started server only; default: reload in place)",
    )
    p.add_argument("--max-rss-growth", type=float, help="fail when memory grows more than this fraction")
    p.add_argument("--json", help="write the report here (it is also printed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = LoadConfig(**{k: v for k, v in vars(args).items() if k in LoadConfig.__dataclass_fields__})
    report = asyncio.run(run_load(cfg))
    report["verdict"] = verdict(report, args.max_rss_growth)
    timeline = report["rss"]["timeline_mb"]
    report["rss"]["timeline_mb"] = timeline[:: max(1, math.ceil(len(timeline) / 120))]  # at most ~120 points
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0 if all(report["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
