"""The native target (--target native): each time loop, with the step's fused kernels, compiled
by numba. Checked against the NumPy target (the readable reference, itself checked against the
unrolled interpreter and central differences in test_specs.py), and its float32 tanh against
the float64 libm one."""

from __future__ import annotations

import glob
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import random_data, rel, small_dims

from rnnc.cli import main
from rnnc.compiler import compile_spec

numba = pytest.importorskip("numba", reason="the native target needs numba (pip install numba)")

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


def test_float64_tanh_exp_and_sigmoid_are_within_2_ulp_of_libm():
    """float64 kernels compute tanh, sigmoid and exp without libm (exp64, tanh64_scalar), so
    that their loops vectorize; against Python's math (libm), element by element."""
    m = compile_spec(os.path.join(ROOT, "bench", "specs", "rnn_layer.rnn"), dims={"I": 2, "H": 2},
                     target="native")  # fmt: skip
    rng = np.random.default_rng(7)
    x = np.concatenate([np.linspace(-25, 25, 20_001), rng.normal(0, 1e-3, 2000), rng.normal(0, 3, 2000),
                        [0.0, -0.0, 0.625, -0.625, np.nextafter(0.625, 1), 1e-300, 5e-324, 19.1, 23.0, 800.0]])  # fmt: skip
    vec = {f: numba.vectorize(["float64(float64)"])(getattr(m.module, f).py_func) for f in ("tanh64_scalar", "exp64")}
    ulps = lambda got, want: np.abs(got - want) / np.spacing(np.maximum(np.abs(want), 2.2250738585072014e-308))  # noqa: E731
    t = vec["tanh64_scalar"](x)
    assert np.max(ulps(t, np.array([math.tanh(v) for v in x]))) <= 2
    assert np.array_equal(vec["tanh64_scalar"](-x), -t) and np.all(np.abs(t) <= 1)
    e_in = np.concatenate([np.linspace(-708.3, 709.0, 20_001), rng.normal(0, 1, 2000), [0.0, -1e-300]])
    assert np.max(ulps(vec["exp64"](e_in), np.array([math.exp(v) for v in e_in]))) <= 2
    assert vec["exp64"](np.array([-709.0, -1e4, -np.inf])).tolist() == [0.0, 0.0, 0.0]  # below 2**-1022
    special = np.array([np.nan, np.inf, -np.inf])
    with np.errstate(invalid="ignore"):  # inf / inf in the branch not taken
        assert np.isnan(vec["exp64"](special[:1])).all()
        assert np.isnan(vec["tanh64_scalar"](special[:1])).all()
        assert vec["tanh64_scalar"](special[1:]).tolist() == [1.0, -1.0]
    sig = numba.vectorize(["float64(float64)"])(m.module.sigmoid64_)
    want = np.array([1 / (1 + math.exp(-v)) if v > -700 else math.exp(v) for v in x])
    assert np.max(np.abs(sig(x) - want) / np.maximum(want, 1e-300)) < 1e-15 * 4


def test_a_float64_step_calls_no_libm_tanh_or_exp(tmp_path, monkeypatch):
    """The float64 LSTM step's compiled code calls no libm tanh or exp (whose scalar calls
    kept its kernels from vectorizing) and works on vectors of doubles, as float32's on floats."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # compiled now: numba inspects no cached code
    m = compile_spec(os.path.join(ROOT, "bench", "specs", "lstm_layer.rnn"), dims={"I": 8, "H": 64},
                     target="native")  # fmt: skip
    _Ts, params, inputs, targets, _L = random_data(m.graph, 4, 2, seed=1)
    m.loss_and_grads(params, inputs, targets)
    steps = [run for name, run in vars(m.module).items() if name.startswith("loss_and_grads_steps")]
    assert len(steps) == 2  # forward and backward
    for run in steps:
        ir = "\n".join(run.made[np.dtype(np.float64)].inspect_llvm().values())
        called = set(re.findall(r"call [^@]*@\"?([A-Za-z_.0-9]+)", ir))
        assert not called & {"tanh", "exp", "llvm.exp.f64", "numba_tanh", "numba_exp"}, called
        assert re.search(r"<(4|8) x double>", ir), run.steps.__name__  # a vectorized kernel


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
    assert "dh_h_next[t % 2] = dh_h_next_t" in m.source  # the text keeps the NumPy target's statement (two rows)
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


@pytest.mark.parametrize("steps", [5, 6])
def test_the_adjoint_handed_to_the_step_before_is_two_rows_not_t_plus_1(steps):
    """dh and dc of the LSTM's backward loop: rows t % 2 of a [2, B, H] buffer (this step's and
    the next one's), where the NumPy target keeps one running value; odd and even T."""
    path = os.path.join(ROOT, "bench", "specs", "lstm_layer.rnn")
    ref, m = both(path, {"I": 3, "H": 5})
    for name in ("dh_c_next", "dh_h_next"):
        assert f"{name} = np.empty((2, B) + (5,), dt)" in m.source
        assert f"{name}[T_x % 2] = adjoint_in(window" in m.source
    _Ts, params, inputs, targets, L = random_data(ref.graph, steps, 3, seed=5, lengths=True)
    init = {"h.c.init": np.full((3, 5), 0.3), "h.h.init": np.full((3, 5), -0.2)}
    loss0, g0 = ref.loss_and_grads(params, {**inputs, **init}, targets, lengths=L)
    loss1, g1 = m.loss_and_grads(params, {**inputs, **init}, targets, lengths=L)
    assert abs(loss1 - loss0) <= 1e-12 * abs(loss0)
    assert all(rel(g1[k], g0[k]) < 1e-12 for k in g0) and {"h.c.init", "h.h.init"} <= set(g1)


def test_loading_a_native_module_compiles_nothing(tmp_path, monkeypatch):
    """numba compiles a loop at its first call, not when the module loads: a process that
    finds the loops in the disk cache pays for no compiling at all (an eagerly typed ufunc
    cost every load ~0.7 s)."""
    import tempfile

    from numba.core.event import install_recorder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with install_recorder("numba:compile") as rec:
        m = compile_spec(os.path.join(ROOT, "bench", "specs", "gru_layer.rnn"), dims={"I": 3, "H": 4},
                         target="native")  # fmt: skip
    assert m.module.NATIVE == {} and not rec.buffer, [str(e.data.get("dispatcher")) for _, e in rec.buffer]


# random cells the whole suite on the native target found (tests/test_random_cells.py): a value
# named for its op (`tanh`) took the name of the native prelude's scalar tanh, and a kernel read
# the source of a slice that the emitter had folded into the slice's statement (never assigned)
FOUND_BY_RANDOM_CELLS = [
    "cell C(x[I]) -> e2[H] {\n  param U[H, I], b[H], P[3*H, I], W3[H, H], W4[H, H], W5[H, H]\n  e0 = U @ x + e0[t-1] + e1[t-1]\n  e1 = sigmoid(e1[t-3]) * tanh(U @ x)\n  e2 = tanh(tanh(U @ x) + e2[t-1])\n}\nmodel m {\n  dim H = 1, I = 1, K = 2, F = 2\n  input x[I] : sequence\n  target y[K] : sequence\n  param Wy[K, H], by[K]\n  h = C(x, H=H, init=learned)\n  loss = mse(Wy @ h + by, y)\n}\n",
    "cell C(x[I]) -> e1[H] {\n  param U[H, I], b[H], P[3*H, I], W3[H, H], A4[H, I], W5[H, H], A6[H, I], W7[H, H]\n  e0 = sigmoid(U @ x[t-2]) * tanh(tanh(A4 @ x + W3 @ e1[t-2]) + tanh(A6 @ x + W5 @ e0[t-3]))\n  e1 = tanh((P @ x)[2*H:3*H] + e1[t-3] + e1[t-1])\n}\nmodel m {\n  dim H = 1, I = 1, K = 3, F = 2\n  input x[I] : sequence\n  target y[K] : sequence\n  param Wy[K, H], by[K], h0[H], Ug[H, I], Wg[H, H], Vg[K, H]\n  h = C(x, H=H, init=h0)\n  g = tanh(Ug @ x + Wg @ g[t+1])\n  loss = mse(Wy @ h + Vg @ g + by, y)\n}\n",
]


@pytest.mark.parametrize("text", FOUND_BY_RANDOM_CELLS, ids=["name-tanh", "slice-source"])
def test_random_cells_that_broke_the_native_target(text):
    ref, m = both(text, {})
    _Ts, params, inputs, targets, _L = random_data(ref.graph, 7, 3, seed=1)
    loss0, g0 = ref.loss_and_grads(params, inputs, targets, with_inputs=True)
    loss1, g1 = m.loss_and_grads(params, inputs, targets, with_inputs=True)
    assert abs(loss1 - loss0) <= 1e-12 * abs(loss0)
    assert all(rel(g1[k], g0[k]) < 1e-12 for k in g0)
    assert all(m.module.NATIVE.values()), m.module.NATIVE_WHY


def test_no_value_takes_a_name_a_target_module_defines():
    from rnnc.lower import Namer
    from rnnc.target_cupy import CupyTarget
    from rnnc.target_numba import NativeTarget

    taken = Namer(compile_spec(FOUND_BY_RANDOM_CELLS[0], load=False).graph).taken
    assert {"tanh", "exp", "flat", "put", "matmul", "native", "launch", "kernel"} <= taken
    assert NativeTarget.reserved() | CupyTarget.reserved() <= taken
