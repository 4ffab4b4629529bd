"""The same PathGuard screener served by KServe's own Python model server (v2 gRPC), for comparison.

Runs under an interpreter that has the ``kserve`` package (its pins conflict with PathGuard's protobuf,
so it lives in its own virtual environment); torch and PathGuard's dependencies are taken from
``--extra-site`` (appended to ``sys.path``, so the kserve venv's own packages win) and ``--repo``.
Started by ``bench/serve_bench.py``; by hand:

    /tmp/kserve-venv/bin/python bench/kserve_model.py --bundle models/default --grpc-port 8081 \
        --http-port 8080 --threads 2 --repo . --extra-site .venv/lib/python3.11/site-packages

KServe's server has no dynamic batching of its own: each ModelInfer runs ``predict`` on its one request.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", default="skipping", help="masked or skipping, as `pathguard serve --engine`")
    parser.add_argument("--repo", required=True, help="PathGuard checkout (for the detector package)")
    parser.add_argument("--extra-site", default="", help="site-packages with torch etc. (appended to sys.path)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when imported
    sys.path.insert(0, args.repo)
    if args.extra_site:
        sys.path.append(args.extra_site)

    import kserve
    import numpy as np
    import torch
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    from detector import load_bundle
    from detector.runtime import set_threads

    set_threads(args.threads)
    bundle = load_bundle(args.bundle)

    class PathGuardModel(kserve.Model):
        def load(self) -> bool:
            self.screener = bundle.screener(engine=args.engine)
            self.screener.screen(torch.full((1, *bundle.input_shape), 0.5))
            self.ready = True
            return self.ready

        def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
            images = payload.inputs[0].as_numpy()
            if images.dtype == np.uint8:
                images = images.astype(np.float32) / 255.0
            result = self.screener.screen(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
            n = len(result)
            outputs = []
            for name, datatype, value in (
                ("probabilities", "FP32", result.probabilities.astype(np.float32)),
                ("predicted_class", "INT64", result.predictions.astype(np.int64)),
                ("adversarial_score", "FP32", result.scores.astype(np.float32)),
                ("is_adversarial", "BOOL", result.flags.astype(np.bool_)),
            ):
                out = InferOutput(name=name, shape=[n, *value.shape[1:]], datatype=datatype)
                out.set_data_from_numpy(value, binary_data=True)
                outputs.append(out)
            return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)

    model = PathGuardModel(bundle.meta["name"])
    model.load()
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1, enable_grpc=True).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
