#!/bin/bash
# The --device cuda paths, on a machine with an NVIDIA GPU (CI has none): the CUDA tests, the two
# determinism tests run on the GPU (device auto picks it), and the adaptive attacks on the default
# bundle on cuda and on the CPU of the same machine. Writes log.txt and the two reports to OUT.
#   bash bench/cuda_check.sh reports/device/cuda-check
set -uo pipefail
OUT=${1:?usage: bench/cuda_check.sh OUT}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
step() { echo; echo "=== $(date +%T) $*"; }
step environment
nvidia-smi -L
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
step "CUDA tests and the determinism tests, on the GPU"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    "tests/test_training.py::test_reproducible_by_seed_and_logged" \
    "tests/test_training_recipe.py::test_resume_ends_with_the_weights_of_an_uninterrupted_run" 2>&1 | tail -25
for dev in cuda cpu; do
    step "adaptive on models/default, --device $dev"
    "$PYTHON" -m pathguard adaptive --bundle models/default --n 40 --eps 0.05,0.1 --steps 20 --restarts 1 \
        --no-transfer --no-plots --out "/tmp/cuda-check-$dev" --device "$dev" --threads 8 --quiet \
        | grep -E "^\| 0\.|FAIL|pass:|per image"
    cp "/tmp/cuda-check-$dev/report.json" "$OUT/adaptive-default-$dev.json"
done
step "query-only attack, --device cuda"
"$PYTHON" -m pathguard adaptive --bundle models/default --out /tmp/cuda-check-query --query-only --query-budget 100 \
    --query-n 10 --eps 0.1 --device cuda --threads 8 --quiet | tail -5
step done
