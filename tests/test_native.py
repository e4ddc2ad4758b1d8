"""The native target (--target native): each time loop, with the step's fused kernels, compiled
by numba. Checked against the NumPy target (the readable reference, itself checked against the
unrolled interpreter and central differences in test_specs.py), and its float32 tanh against
the float64 libm one."""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import random_data, rel, small_dims

from rnnc.cli import main
from rnnc.compiler import compile_spec

numba = pytest.importorskip("numba", reason="the native target needs numba (pip install rnnc[native])")

ROOT = os.path.join(os.path.dirname(__file__), "..")
BENCH = sorted(glob.glob(os.path.join(ROOT, "bench", "specs", "*.rnn")))
# loops numba cannot type yet (values over every step s of another sequence): they run as Python
AS_PYTHON = {"attention_additive.rnn", "attention_dot.rnn"}


def both(spec: str, dims: dict[str, int]):
    return compile_spec(spec, dims=dims), compile_spec(spec, dims=dims, target="native")


def test_every_spec_equals_the_numpy_target_in_float64(spec):
    ref, m = both(spec, small_dims(spec))
    _Ts, params, inputs, targets, L = random_data(ref.graph, 6, 3, seed=2, lengths=True)
    loss0, g0 = ref.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    loss1, g1 = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    assert abs(loss1 - loss0) <= 1e-12 * abs(loss0)
    assert set(g1) == set(g0)
    for k in g0:
        assert rel(g1[k], g0[k]) < 1e-12, k
    o0, o1 = ref.forward(params, inputs, lengths=L), m.forward(params, inputs, lengths=L)
    for k in o0:
        assert rel(o1[k], o0[k]) < 1e-12, k
    ran = m.module.NATIVE
    assert ran, "the compiled loops ran"
    if os.path.basename(spec) in AS_PYTHON:
        assert all(m.module.NATIVE_WHY[k] for k, v in ran.items() if not v)
    else:
        assert all(ran.values()), m.module.NATIVE_WHY


@pytest.mark.parametrize("spec", BENCH, ids=[os.path.basename(s) for s in BENCH])
def test_float32_stays_float32_and_equals_the_numpy_target(spec):
    ref, m = both(spec, {"I": 12, "H": 16})
    _Ts, params, inputs, targets, L = random_data(ref.graph, 7, 3, seed=3, lengths=True)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    targets = {k: v.astype(np.float32) for k, v in targets.items()}
    loss0, g0 = ref.loss_and_grads(params, inputs, targets, lengths=L)
    loss1, g1 = m.loss_and_grads(params, inputs, targets, lengths=L)
    assert abs(loss1 - loss0) <= 1e-5 * abs(loss0)
    for k in g0:
        assert g1[k].dtype == np.float32, k
        assert rel(g1[k], g0[k]) < 1e-5, k
    assert all(m.module.NATIVE.values()), m.module.NATIVE_WHY


def test_float32_tanh_is_within_8_ulp_of_libm():
    m = compile_spec(os.path.join(ROOT, "bench", "specs", "rnn_layer.rnn"), dims={"I": 2, "H": 2},
                     target="native")  # fmt: skip
    x = np.concatenate([np.linspace(-12, 12, 400_001), [0.0, 1e-30, -1e-30, 3e-4, 5e-4, 40.0, -40.0]])
    x = x.astype(np.float32)
    y = m.module.tanh32(x)
    assert y.dtype == np.float32
    want = np.array([math.tanh(float(v)) for v in x[::97]] + [math.tanh(float(v)) for v in x[-7:]])
    got = np.concatenate([y[::97], y[-7:]]).astype(np.float64)
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - want) / ulp) <= 8
    assert np.array_equal(m.module.tanh32(-x), -y)  # odd
    assert np.all(np.abs(y) <= 1)


def test_a_loop_numba_cannot_type_runs_as_python_and_says_why():
    ref, m = both(os.path.join(ROOT, "specs", "attention_dot.rnn"), {"S": 5, "V": 6, "H": 4})
    _Ts, params, inputs, targets, L = random_data(ref.graph, 5, 3, seed=4, lengths=True)
    loss0, g0 = ref.loss_and_grads(params, inputs, targets, lengths=L)
    loss1, g1 = m.loss_and_grads(params, inputs, targets, lengths=L)
    assert abs(loss1 - loss0) <= 1e-12 * abs(loss0)
    assert all(rel(g1[k], g0[k]) < 1e-12 for k in g0)
    python = [k for k, v in m.module.NATIVE.items() if not v]
    assert python and all("signature" in m.module.NATIVE_WHY[k] for k in python)
    assert any(m.module.NATIVE.values())  # the encoder's loops compiled


def test_the_module_reads_like_the_numpy_target_and_runs_without_rnnc(tmp_path):
    path = tmp_path / "model.py"
    spec = os.path.join(ROOT, "specs", "lstm.rnn")
    assert main(["compile", spec, "--dim", "H=8", "--target", "native", "-o", str(path)]) == 0
    src = path.read_text()
    assert "import numba" in src and "import rnnc" not in src
    assert "@native\ndef loss_and_grads_steps0(" in src
    assert "# c = f * c[t-1] + i * g  (lstm.rnn:10)" in src
    script = (
        "import sys, importlib.util, numpy as np\n"
        "sys.modules['rnnc'] = None\n"
        "s = importlib.util.spec_from_file_location('model', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(s); sys.modules['model'] = m; s.loader.exec_module(m)\n"
        "p = m.init_params(0)\n"
        "x = np.random.default_rng(0).normal(size=(5, 2, 27)).astype(np.float32)\n"
        "y = np.zeros((5, 2), int)\n"
        "loss, g = m.loss_and_grads(p, {'x': x}, {'y': y})\n"
        "print('ok', all(m.NATIVE.values()), np.isfinite(loss))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                         cwd=tmp_path, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok True True"


def test_the_cli_trains_with_the_native_target_as_with_numpy(tmp_path):
    weights = []
    for target in ("numpy", "native"):
        ck = tmp_path / f"{target}.npz"
        args = ["run", os.path.join(ROOT, "specs", "adding_lstm.rnn"), "--task", "adding", "--dim", "H=8",
                "--seq-len", "6", "--batch", "4", "--steps", "12", "--train", "--float64", "--quiet",
                "--seed", "3", "--target", target, "--checkpoint", str(ck)]  # fmt: skip
        assert main(args) == 0
        weights.append(dict(np.load(ck)))
    assert set(weights[0]) == set(weights[1])
    for k in weights[0]:
        assert rel(weights[1][k], weights[0][k]) < 1e-10, k


def test_explain_counts_the_kernels_and_times_the_native_code(capsys):
    spec = os.path.join(ROOT, "bench", "specs", "lstm_layer.rnn")
    args = ["compile", spec, "--target", "native", "--explain", "--batch", "2", "--steps", "5", "--dim", "H=8", "--dim", "I=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "lstm_layer, native target, float32" in out
    assert out.count("1 fused kernel") == 3  # forward; and loss_and_grads' forward and backward loops
    assert out.count("measured:") == 2


@pytest.mark.parametrize("spec", ["lstm_layer.rnn", "gru_layer.rnn"])
def test_one_sequence_takes_the_matrix_vector_products_exactly(spec):
    # B = 1: the step's products are BLAS gemv calls (x @ W.T forward, dz @ W backward)
    ref, m = both(os.path.join(ROOT, "bench", "specs", spec), {"I": 5, "H": 7})
    _Ts, params, inputs, targets, _ = random_data(ref.graph, 6, 1, seed=5)
    loss0, g0 = ref.loss_and_grads(params, inputs, targets, with_inputs=True)
    loss1, g1 = m.loss_and_grads(params, inputs, targets, with_inputs=True)
    assert abs(loss1 - loss0) <= 1e-12 * abs(loss0)
    for k in g0:
        assert rel(g1[k], g0[k]) < 1e-12, k
    assert all(m.module.NATIVE.values())


def test_the_same_file_loaded_under_another_name_still_compiles(tmp_path):
    # numba's disk cache names the module that wrote it; a process that loads the same file
    # under another name (a user's import of a compiled file) recompiles instead of failing
    path = tmp_path / "model.py"
    spec = os.path.join(ROOT, "bench", "specs", "rnn_layer.rnn")
    assert main(["compile", spec, "--dim", "H=3", "--dim", "I=2", "--target", "native", "-o", str(path)]) == 0
    script = (
        "import sys, importlib.util, numpy as np\n"
        "s = importlib.util.spec_from_file_location(sys.argv[2], sys.argv[1])\n"
        "m = importlib.util.module_from_spec(s); sys.modules[sys.argv[2]] = m; s.loader.exec_module(m)\n"
        "x = np.random.default_rng(0).normal(size=(4, 2, 2))\n"
        "h = m.forward(m.init_params(0, np.float64), {'x': x})['h']\n"
        "print(all(m.NATIVE.values()) and bool(m.NATIVE), repr(h.sum()))\n"
    )
    outs = []
    for name in ("first_name", "second_name"):
        run = subprocess.run([sys.executable, "-c", script, str(path), name], capture_output=True,
                             text=True, cwd=tmp_path, check=False)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        outs.append(run.stdout)
    assert outs[0] == outs[1] and outs[0].startswith("True ")


def test_a_loop_stores_its_rows_without_numbas_slice_assignment(tmp_path, monkeypatch):
    """A step's row of a stored value is written by put() (a loop), not numba's slice
    assignment, whose shape-mismatch message formatting made half of a first compile (3.6 of
    7 s for the LSTM's loss_and_grads); the loops compile without it, and equal NumPy."""
    import tempfile

    from numba.core.event import install_recorder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a cold disk cache
    path = os.path.join(ROOT, "bench", "specs", "lstm_layer.rnn")
    m = compile_spec(path, target="native", dims={"I": 3, "H": 5})
    assert "dh_h_next[t] = dh_h_next_t" in m.source  # the text keeps the NumPy target's statement
    rng = np.random.default_rng(0)
    params = m.init_params(0, np.float32)
    x, y = rng.normal(size=(4, 2, 3)).astype(np.float32), rng.normal(size=(4, 2, 5)).astype(np.float32)
    with install_recorder("numba:compile") as rec:
        loss, grads = m.loss_and_grads(params, {"x": x}, {"y": y})
    built = [str(e.data.get("dispatcher")) for _, e in rec.buffer if e.is_start]
    assert any("steps" in b for b in built) and any("put_row" in b for b in built), built
    assert not any("raise_with_shape_context" in b for b in built), built
    want = compile_spec(path, dims={"I": 3, "H": 5}).loss_and_grads(params, {"x": x}, {"y": y})
    assert abs(loss - want[0]) <= 1e-5 * abs(want[0])
    assert all(rel(grads[k], want[1][k]) < 1e-5 for k in grads)
