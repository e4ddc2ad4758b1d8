#!/usr/bin/env bash
# The GPU half of the CuPy target, for a session that has a GPU machine (the `device` tool):
#   bench/gpu_check.sh tests   # pytest -m gpu: every spec and 30 random cells == NumPy, training
#   bench/gpu_check.sh bench   # launches per step, a short training run, the timing against cuDNN
# Each part fits one 10-minute device call. Logs go to $OUT (the device tool's folder) or
# /tmp/rnnc-gpu. The device image has numpy, networkx, hypothesis, tqdm, pytest, CuPy and
# PyTorch but no lark: carry it as a wheel (download it here first, see the README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rnnc-gpu}
mkdir -p "$OUT"
if ! python3 -c "import lark" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/rnnc-site .whl/lark-*.whl || exit 1
    export PYTHONPATH=/tmp/rnnc-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/device.txt"
part=${1:-tests}
if [ "$part" = tests ]; then
    python3 -m pytest -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
    exit "${PIPESTATUS[0]}"
fi
python3 bench/bench_cupy.py --launches 2>&1 | tee "$OUT/launches.txt"
python3 -m rnnc.cli_entry run specs/adding_lstm.rnn --train --task adding --target cupy \
    --steps 300 --quiet --log "$OUT/train_cupy.jsonl" 2>&1 | tee "$OUT/train_cupy.txt"
python3 bench/bench_cupy.py --rounds "${ROUNDS:-3}" 2>&1 | tee "$OUT/bench_cupy.txt"
