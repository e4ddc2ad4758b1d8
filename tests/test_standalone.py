"""The generated module runs in a process where rnnc cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys

from rnnc.cli import main

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")

SCRIPT = """
import sys
sys.modules["rnnc"] = None  # any `import rnnc` now fails
import importlib.util
import numpy as np
spec = importlib.util.spec_from_file_location("model", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
params = m.init_params(0, np.float64)
rng = np.random.default_rng(0)
T, B = 6, 2
def make(table):
    out = {}
    for name, (shape, level, labels) in table.items():
        lead = (T, B) if level != "static" else (B,)
        out[name] = rng.integers(0, shape[0], lead) if labels else rng.normal(size=lead + shape)
    return out
inputs, targets = make(m.INPUTS), make(m.TARGETS)
out = m.forward(params, inputs)
loss, grads = m.loss_and_grads(params, inputs, targets)
assert np.isfinite(loss) and set(grads) >= set(params)
print("ok", round(loss, 6))
"""


def test_generated_module_runs_without_rnnc(tmp_path):
    path = tmp_path / "model.py"
    assert main(["compile", os.path.join(SPECS, "lstm.rnn"), "--dim", "H=8", "-o", str(path)]) == 0
    source = path.read_text()
    assert "import rnnc" not in source and "from rnnc" not in source
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True,
                         cwd=tmp_path, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok")


def test_generated_code_reads_like_the_spec(tmp_path):
    path = tmp_path / "elman.py"
    assert main(["compile", os.path.join(SPECS, "elman.rnn"), "-o", str(path)]) == 0
    src = path.read_text()
    assert "Do not edit; edit the spec." in src
    assert "# s = tanh(U @ x + W @ s[t-1] + b)  (elman.rnn:8)" in src
    assert "for t in range(T_x):" in src and "for t in range(T_x - 1, -1, -1):" in src
    assert "dW = outer(" in src  # the weight gradient: one GEMM after the loop
    compile(src, str(path), "exec")
