"""KServe v2 client side of ``make image-test`` (deploy/image_test.py), through ``tritonclient.grpc``.

A script of its own: tritonclient and PathGuard's generated ``inference`` protos cannot live in one Python
process (duplicate descriptor symbols), so the image test runs this in a subprocess. It imports neither
``service`` nor ``detector``. Images come from an ``.npy`` file (uint8, N x 1 x 28 x 28); results go to stdout
as one JSON object.

  screen  wait until the server is ready, screen every image in calls of --batch, print predictions and scores
  load    --clients threads send --batch images per call until the server refuses them (it drains on SIGTERM);
          print one record per call: start/end (time.time()), status, outputs checked against --expect
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

MODEL = "pathguard"


def infer(client: tc.InferenceServerClient, images: np.ndarray, timeout: float) -> tuple[np.ndarray, np.ndarray]:
    x = images.astype(np.float32) / 255.0
    inp = tc.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outputs = [tc.InferRequestedOutput("predicted_class"), tc.InferRequestedOutput("adversarial_score")]
    res = client.infer(MODEL, [inp], outputs=outputs, client_timeout=timeout)
    return res.as_numpy("predicted_class"), res.as_numpy("adversarial_score")


def wait_ready(client: tc.InferenceServerClient, target: str, timeout: float) -> tuple[float, int]:
    """Seconds until the server and model report ready, and the RPCs it took (each one answered)."""
    start, rpcs = time.monotonic(), 0
    while True:
        try:
            rpcs += 1
            if client.is_server_ready(client_timeout=5):
                rpcs += 1
                if client.is_model_ready(MODEL, client_timeout=5):
                    return time.monotonic() - start, rpcs
        except InferenceServerException:
            rpcs -= 1  # not answered: the server is not up yet
        if time.monotonic() - start > timeout:
            raise SystemExit(f"server at {target} not ready after {timeout:.0f} s")
        time.sleep(0.5)


def cmd_screen(args: argparse.Namespace) -> dict:
    images = np.load(args.images)
    with tc.InferenceServerClient(args.target) as client:
        ready_s, rpcs = wait_ready(client, args.target, args.wait)
        meta = client.get_model_metadata(MODEL, as_json=True)
        rpcs += 1
        preds, scores = [], []
        start = time.perf_counter()
        for i in range(0, len(images), args.batch):
            p, s = infer(client, images[i : i + args.batch], args.timeout)
            preds.append(p)
            scores.append(s)
            rpcs += 1
        seconds = time.perf_counter() - start
    return {
        "ready_seconds": ready_s,
        "model_metadata": meta,
        "seconds": seconds,
        "calls": rpcs,
        "predicted_class": np.concatenate(preds).tolist(),
        "adversarial_score": np.concatenate(scores).tolist(),
    }


def cmd_load(args: argparse.Namespace) -> dict:
    images = np.load(args.images)
    expect = np.load(args.expect) if args.expect else None
    records: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.duration
    first_answer = threading.Event()

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        with tc.InferenceServerClient(args.target) as client:
            while time.monotonic() < deadline:
                i = int(rng.integers(0, len(images) - args.batch + 1))
                rec = {"client": k, "start": time.time(), "images": args.batch}
                try:
                    preds, _ = infer(client, images[i : i + args.batch], args.timeout)
                    rec.update(status="OK", answered=int(len(preds)))
                    if expect is not None:
                        rec["mismatched"] = int((preds != expect[i : i + args.batch]).sum())
                    first_answer.set()
                except InferenceServerException as exc:
                    rec.update(status=str(exc.status()).removeprefix("StatusCode."), message=exc.message())
                rec["end"] = time.time()
                with lock:
                    records.append(rec)
                if rec["status"] != "OK":
                    return  # refused (the server is draining or gone): this client stops

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(args.clients)]
    for t in threads:
        t.start()
    if first_answer.wait(args.wait):
        print("LOADED", file=sys.stderr, flush=True)  # the image test sends SIGTERM after this
    for t in threads:
        t.join()
    return {"clients": args.clients, "batch": args.batch, "calls": sorted(records, key=lambda r: r["start"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["screen", "load"])
    parser.add_argument("--target", required=True, help="HOST:PORT of the server's gRPC port")
    parser.add_argument("--images", required=True, help=".npy of uint8 images (N, 1, 28, 28)")
    parser.add_argument("--expect", help="load: .npy of the predicted class expected for each image")
    parser.add_argument("--batch", type=int, default=32, help="images per call")
    parser.add_argument("--clients", type=int, default=8, help="load: concurrent clients")
    parser.add_argument("--duration", type=float, default=120.0, help="load: stop sending after this many s")
    parser.add_argument("--wait", type=float, default=180.0, help="seconds to wait for the server")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each call, s")
    args = parser.parse_args(argv)
    out = cmd_screen(args) if args.command == "screen" else cmd_load(args)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
