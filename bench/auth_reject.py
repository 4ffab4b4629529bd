"""How fast an unauthenticated 16 MiB request is refused, and proof that its body is never parsed.

``pathguard serve`` (subprocess, loopback, a bearer token, ``--max-message-mb 64`` so that only
authentication can refuse the request) gets ``--n`` unauthenticated ScreenImages calls of 16 MiB each,
then as many of the same size with the valid token, which the server reads and parses before refusing them
as INVALID_ARGUMENT (not decodable images): the like-for-like cost of reading the body. The report holds
the median and p90 time of each kind and ``pathguard_request_bytes_parsed_total`` before and after the
unauthenticated calls (its change must be 0).

    .venv/bin/python -m bench.auth_reject --json reports/service/auth.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.helpers import ServerProcess, scrape
from service._proto.pathguard.v1 import pathguard_pb2 as pb

SIZE = 16 << 20
SCREEN = "/pathguard.v1.PathGuard/ScreenImages"
PARSED = "pathguard_request_bytes_parsed_total"


def timed(call, payload: bytes, metadata, want: grpc.StatusCode, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        try:
            call(payload, timeout=60, metadata=metadata)
            raise RuntimeError("the call was not refused")
        except grpc.RpcError as exc:
            if exc.code() != want:
                raise RuntimeError(f"expected {want.name}, got {exc.code().name}: {exc.details()}") from None
        out.append(time.perf_counter() - start)
    return out


def summary(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "median_ms": round(1000 * statistics.median(ordered), 2),
        "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 2),
        "n": len(ordered),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="models/default")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    token_file = Path(tempfile.mkdtemp(prefix="pathguard-auth-")) / "token"
    token_file.write_text("bench-token\n")
    server = ServerProcess(args.bundle, args=["--auth-token-file", str(token_file), "--max-message-mb", "64"])
    payload = pb.ScreenRequest(encoded=pb.EncodedImages(images=[b"\0" * SIZE])).SerializeToString()
    try:
        with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            call = ch.unary_unary(SCREEN, response_deserializer=pb.ScreenResponse.FromString)
            before = scrape(server.metrics_url).get(PARSED, 0.0)
            anonymous = timed(call, payload, (), grpc.StatusCode.UNAUTHENTICATED, args.n)
            after = scrape(server.metrics_url).get(PARSED, 0.0)
            authorised = timed(
                call, payload, (("authorization", "Bearer bench-token"),), grpc.StatusCode.INVALID_ARGUMENT, args.n
            )
            parsed_after_authorised = scrape(server.metrics_url).get(PARSED, 0.0)
    finally:
        server.kill()
    report = {
        "request_bytes": len(payload),
        "unauthenticated": summary(anonymous),
        "authorised_read_then_refused": summary(authorised),
        "bytes_parsed_by_unauthenticated_calls": after - before,
        "bytes_parsed_by_authorised_calls": parsed_after_authorised - after,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if report["bytes_parsed_by_unauthenticated_calls"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
