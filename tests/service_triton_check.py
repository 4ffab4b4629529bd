"""Talk to a PathGuard server with an unmodified ``tritonclient.grpc`` and print what it saw as JSON.

Run in a subprocess by the tests: tritonclient's generated ``inference.*`` protos and PathGuard's own
cannot be imported into one process (duplicate descriptor symbols).

    python tests/service_triton_check.py --url 127.0.0.1:50051 --model pathguard --images x.npy
    python tests/service_triton_check.py ... --policy   # what the server's score policy lets through
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True, help=".npy float32 (N, C, H, W) in [0, 1]")
    parser.add_argument("--policy", action="store_true", help="check only what the score policy lets through")
    args = parser.parse_args()
    images = np.load(args.images).astype(np.float32)
    client = grpcclient.InferenceServerClient(url=args.url)
    if args.policy:
        json.dump(policy_check(client, args.model, images), sys.stdout)
        return 0
    out: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(args.model),
        "server_name": client.get_server_metadata().name,
    }
    meta = client.get_model_metadata(args.model)
    out["metadata"] = {
        "name": meta.name,
        "versions": list(meta.versions),
        "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
        "outputs": {t.name: [t.datatype, list(t.shape)] for t in meta.outputs},
    }

    inp = grpcclient.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    result = client.infer(args.model, [inp], request_id="fp32-1")
    out["fp32"] = {
        "id": result.get_response().id,
        "predicted_class": result.as_numpy("predicted_class").tolist(),
        "probabilities": result.as_numpy("probabilities").tolist(),
        "adversarial_score": result.as_numpy("adversarial_score").tolist(),
        "is_adversarial": result.as_numpy("is_adversarial").tolist(),
        "dtypes": {
            name: str(result.as_numpy(name).dtype)
            for name in ("predicted_class", "probabilities", "adversarial_score", "is_adversarial")
        },
    }

    pixels = np.rint(images * 255).astype(np.uint8)
    inp = grpcclient.InferInput("images", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    wanted = [grpcclient.InferRequestedOutput("predicted_class"), grpcclient.InferRequestedOutput("adversarial_score")]
    result = client.infer(args.model, [inp], outputs=wanted)
    out["uint8"] = {
        "outputs": [o.name for o in result.get_response().outputs],
        "predicted_class": result.as_numpy("predicted_class").tolist(),
    }

    try:
        client.infer("no-such-model", [inp])
        out["unknown_model"] = "OK"
    except InferenceServerException as exc:
        out["unknown_model"] = exc.status()
    json.dump(out, sys.stdout)
    return 0


def policy_check(client, model: str, images: np.ndarray) -> dict:
    """The outputs listed and answered when none is named, the response parameters, and what asking for the
    adversarial score explicitly gets."""
    meta = client.get_model_metadata(model)
    inp = grpcclient.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    result = client.infer(model, [inp])
    response = result.get_response()
    out = {
        "metadata_outputs": [t.name for t in meta.outputs],
        "outputs": {o.name: result.as_numpy(o.name).tolist() for o in response.outputs},
        "parameters": {k: v.string_param for k, v in response.parameters.items()},
    }
    try:
        client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("adversarial_score")])
        out["asked_for_score"] = "OK"
    except InferenceServerException as exc:
        out["asked_for_score"] = f"{exc.status()}: {exc.message()}"
    return out


if __name__ == "__main__":
    sys.exit(main())
