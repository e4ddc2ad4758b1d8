"""The generated module runs in a process where rnnc cannot be imported."""

from __future__ import annotations

import os
import re
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


def test_generated_names_come_from_the_specs_roles(tmp_path):
    """Values are named after what they are in the spec, not after the ops that make them:
    the LSTM's merged input and forget gates, the tanh of its cell, what a state's adjoint
    gets from the next step and from the loss; a library cell's equations are quoted from
    the library, even where the user's spec is longer than the library's line numbers."""
    text = "".join(f"# line {i}\n" for i in range(40)) + (
        "use LSTM\n\nmodel m {\n  dim I = 3, H = 5\n  input x[I] : sequence\n"
        "  target y[H] : sequence\n  h = LSTM(x, H=H)\n  loss = mse(h, y)\n}\n"
    )
    spec = tmp_path / "long.rnn"
    spec.write_text(text)
    path = tmp_path / "long.py"
    assert main(["compile", str(spec), "-o", str(path)]) == 0
    src = path.read_text()
    for name in ("h_if_t = sigmoid(", "h_h_tanh_t = np.tanh(h_c_t)", "dh_h_from_loss = ",
                 "dh_c_next_run = dh_c_next_t", "dh_h_next_t = dh_z_t @ h_weight_hh"):  # fmt: skip
        assert name in src, name
    for op_name in ("mul_mul", "matmul_matmul_t", "sigmoid2", "tanh_t", "tanh"):
        assert not re.search(rf"\b{op_name}\b(?!\()", src.split("def init_params")[1]), op_name
    assert "# z = weight_ih @ x + bias_ih + weight_hh @ h[t-1] + bias_hh  (cells.rnn:" in src
    assert "# line 2" not in src.split('"""', 2)[2]  # no line of the user's quoted for the library's
