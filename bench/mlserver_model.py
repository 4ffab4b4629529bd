"""The same PathGuard screener as a Seldon MLServer runtime, with MLServer's adaptive batching, for comparison.

MLServer lives in its own virtual environment (``python3 -m venv /tmp/mlserver-venv &&
/tmp/mlserver-venv/bin/pip install mlserver``); torch and PathGuard's dependencies come from
``PATHGUARD_EXTRA_SITE`` (appended to ``sys.path``, so MLServer's own packages win) and the checkout from
``PATHGUARD_REPO``. ``bench/serve_cost.py`` writes the model settings (``max_batch_size``, ``max_batch_time``:
adaptive batching on) and starts ``mlserver start`` with inference in the server process
(``MLSERVER_PARALLEL_WORKERS=0``) and ``PATHGUARD_THREADS`` torch threads.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.environ["PATHGUARD_REPO"])
if os.environ.get("PATHGUARD_EXTRA_SITE"):
    sys.path.append(os.environ["PATHGUARD_EXTRA_SITE"])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlserver import MLModel  # noqa: E402
from mlserver.codecs import NumpyCodec  # noqa: E402
from mlserver.types import InferenceRequest, InferenceResponse  # noqa: E402

from detector import load_bundle  # noqa: E402
from detector.runtime import set_threads  # noqa: E402


class PathGuardRuntime(MLModel):
    async def load(self) -> bool:
        set_threads(int(os.environ.get("PATHGUARD_THREADS", "1")))
        bundle = load_bundle(self.settings.parameters.uri)
        self.screener = bundle.screener(engine=os.environ.get("PATHGUARD_ENGINE", "skipping"))
        self.screener.screen(torch.full((1, *bundle.input_shape), 0.5))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = NumpyCodec.decode_input(payload.inputs[0])
        result = self.screener.screen(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        outputs = [
            NumpyCodec.encode_output(name, value)
            for name, value in (
                ("probabilities", result.probabilities.astype(np.float32)),
                ("predicted_class", result.predictions.astype(np.int64)),
                ("adversarial_score", result.scores.astype(np.float32)),
                ("is_adversarial", result.flags.astype(np.bool_)),
            )
        ]
        return InferenceResponse(model_name=self.name, outputs=outputs)
