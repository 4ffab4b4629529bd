"""What an unmodified ``tritonclient.grpc`` sees of a PathGuard server's score policy, printed as JSON.

Run in a subprocess by the tests (tritonclient's generated ``inference.*`` protos and PathGuard's own cannot
share a process):

    python tests/service_triton_policy.py --url 127.0.0.1:50051 --model pathguard --images x.npy
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True, help=".npy float32 (N, C, H, W) in [0, 1]")
    args = parser.parse_args()
    images = np.load(args.images).astype(np.float32)
    client = grpcclient.InferenceServerClient(url=args.url)
    meta = client.get_model_metadata(args.model)
    inp = grpcclient.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    result = client.infer(args.model, [inp])  # no outputs named: every output the server answers with
    response = result.get_response()
    out = {
        "metadata_outputs": [t.name for t in meta.outputs],
        "outputs": {o.name: result.as_numpy(o.name).tolist() for o in response.outputs},
        "parameters": {k: v.string_param for k, v in response.parameters.items()},
    }
    try:
        client.infer(args.model, [inp], outputs=[grpcclient.InferRequestedOutput("adversarial_score")])
        out["asked_for_score"] = "OK"
    except InferenceServerException as exc:
        out["asked_for_score"] = f"{exc.status()}: {exc.message()}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
