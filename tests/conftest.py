import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files; the test process owns the backend choice
torch.set_num_threads(int(os.environ.get("PATHGUARD_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO / "models" / "default"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A vgg8 bundle trained on the synthetic dataset, with prototypes and a fitted detector."""
    from synthetic import make_bundle

    return make_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def default_bundle() -> Path:
    if not (DEFAULT_BUNDLE / "bundle.json").is_file():
        pytest.fail(f"the default bundle is missing at {DEFAULT_BUNDLE}")
    return DEFAULT_BUNDLE


# numpy/scikit-learn BLAS threads too: on small machines oversubscription makes small fits many times slower
from threadpoolctl import threadpool_limits  # noqa: E402

threadpool_limits(int(os.environ.get("PATHGUARD_TEST_THREADS", "2")))
