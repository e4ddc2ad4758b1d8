"""Checkpointing over time (rnnc.remat): the gradient taken in windows equals plain BPTT's in
float64 (1e-12) for every spec that can be cut into windows, with lengths, masks, carried state,
time=mean losses, input gradients, on the NumPy, native and (stand-in) CuPy targets and for
random cells; the rest are refused with the reason; the memory it holds grows like √T."""

from __future__ import annotations

import functools
import os
import tracemalloc

import numpy as np
import pytest
from helpers import random_data, rel, small_dims
from hypothesis import given, settings
from strategies import cells

from rnnc import remat
from rnnc.compiler import compile_spec
from rnnc.errors import RnncError
from rnnc.format import format_program
from rnnc.memory import estimate

ROOT = os.path.join(os.path.dirname(__file__), "..")
SPECS = os.path.join(ROOT, "specs")
WINDOWABLE = ["elman.rnn", "elman_relu.rnn", "generator.rnn", "gru.rnn", "jordan.rnn", "ln_lstm.rnn",
              "lstm.rnn", "lstm_dropout.rnn", "lstm_peephole.rnn", "lstm_zoneout.rnn", "mgu.rnn"]  # fmt: skip
REFUSED = {  # spec: what the error says
    "many_to_one.rnn": "last(...) (or final(...)) reads each sequence's last step",
    "birnn.rnn": "read at a later step (t+1): a backward recurrence",
    "backward.rnn": "read at a later step (t+1)",
    "higher_order.rnn": "read 2 steps back",
    "attention_dot.rnn": "2 time domains",
    "self_attention.rnn": "attention reads every step",
    "captioning.rnn": "enters at the first step only",
}
MEAN_LOSS = """
cell Cell(x[I]) -> h[H] {
  param W[H, H], U[H, I], b[H]
  h = tanh(W @ h[t-1] + U @ x + b)
}

model m {
  dim I = 3, H = 4
  input x[I] : sequence
  target y[H] : sequence
  h = Cell(x, H=H)
  loss = mse(h, y, time=mean)
}
"""


def same(a, b, tol=1e-12) -> None:
    """(loss, grads[, carry]) of the two calls agree to tol, in the same order of names."""
    assert len(a) == len(b)
    assert abs(a[0] - b[0]) <= tol * max(abs(a[0]), 1e-30)
    assert list(a[1]) == list(b[1])
    for k in a[1]:
        assert rel(np.asarray(b[1][k]), np.asarray(a[1][k])) <= tol, k
    if len(a) == 3:
        assert list(a[2]) == list(b[2])
        for k in a[2]:
            assert rel(np.asarray(b[2][k]), np.asarray(a[2][k])) <= tol, k


def data(m, T=13, B=4, seed=0, lengths=True):
    _, params, inputs, targets, L = random_data(m.graph, T, B, seed=seed, lengths=lengths)
    if L is not None:  # a full sequence, one of a single step and one ending at a window's edge
        dom = next(iter(L))
        L[dom][:3] = (T, 1, 6)
    return params, inputs, targets, L


@pytest.mark.parametrize("name", WINDOWABLE)
@pytest.mark.parametrize("every", [1, 3, 6, None])
def test_windows_equal_plain_bptt(name, every, monkeypatch):
    path = os.path.join(SPECS, name)
    m = compile_spec(path, dims=small_dims(path))
    params, inputs, targets, L = data(m)
    a = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    calls, plain = [], m.module.loss_and_grads
    monkeypatch.setattr(m.module, "loss_and_grads", lambda *a, **k: calls.append(a[1]) or plain(*a, **k))
    b = remat.loss_and_grads(m, params, inputs, targets, every, lengths=L, with_inputs=True)
    same(a, b)
    k = every or 4  # None: ⌈√13⌉
    assert [len(next(iter(x.values()))) for x in calls[::-1]] == [min(k, 13 - lo) for lo in range(0, 13, k)]


@pytest.mark.parametrize("lengths", [False, True])
def test_a_carried_state_in_and_out(lengths):
    """Truncated BPTT's carry through the windows: the same final state, and the initial
    states' gradients 0 as in plain BPTT's (the state came from the carry)."""
    path = os.path.join(SPECS, "lstm.rnn")
    m = compile_spec(path, dims=small_dims(path))
    params, inputs, targets, L = data(m, lengths=lengths)
    _, _, carry = m.loss_and_grads(params, inputs, targets, lengths=L, return_carry=True)
    a = m.loss_and_grads(params, inputs, targets, lengths=L, carry=carry, return_carry=True)
    b = m.loss_and_grads(params, inputs, targets, lengths=L, carry=carry, return_carry=True, remat=4)
    same(a, b)
    assert not np.any(b[1]["h.h.init"]) and np.any(b[1]["h.Wh"] if "h.Wh" in b[1] else b[1]["Wy"])


def test_a_time_mean_loss_weighs_by_the_whole_sequences_length():
    m = compile_spec(MEAN_LOSS)
    params, inputs, targets, L = data(m, T=11)
    for lengths in (None, L):
        a = m.loss_and_grads(params, inputs, targets, lengths=lengths)
        same(a, m.loss_and_grads(params, inputs, targets, lengths=lengths, remat=3))


def test_masks_drawn_once_for_the_whole_sequence():
    """Training's dropout and zoneout masks: drawn from rng once and cut like the inputs, so
    the windows equal plain BPTT with the same masks given."""
    path = os.path.join(SPECS, "lstm_zoneout.rnn")
    m = compile_spec(path, dims=small_dims(path))
    params, inputs, targets, L = data(m)
    inputs = {k: v for k, v in inputs.items() if k not in m.masks}
    masks = m.draw_masks(inputs, np.random.default_rng(7))
    a = m.loss_and_grads(params, {**inputs, **masks}, targets, lengths=L)
    b = m.loss_and_grads(params, inputs, targets, lengths=L, rng=np.random.default_rng(7), remat=5)
    same(a, b)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_cannot_be_cut_into_windows_is_refused_with_the_reason(name):
    path = os.path.join(SPECS, name)
    m = compile_spec(path, dims=small_dims(path))
    params, inputs, targets, _ = data(m, lengths=False)
    with pytest.raises(RnncError) as e:
        m.loss_and_grads(params, inputs, targets, remat=3)
    assert e.value.code == "E585" and REFUSED[name] in e.value.message
    assert remat.reason_not_windowable(m.graph) is not None


def test_a_model_without_a_loss_has_no_gradient_to_checkpoint():
    m = compile_spec(MEAN_LOSS.replace("  loss = mse(h, y, time=mean)\n", ""))
    with pytest.raises(RnncError, match="checkpointing takes a gradient, and this model has no loss"):
        remat.require_windowable(m)


@settings(max_examples=20)
@given(cells(causal=True))
def test_random_causal_cells_windowed_equal_plain(case):
    """Any cell whose steps meet through t-1 (gates, layer norms, dropout and zoneout masks,
    stacks): the windows' loss and gradients equal plain BPTT's."""
    program, opt = case
    m = compile_spec(format_program(program))
    assert remat.reason_not_windowable(m.graph) is None, format_program(program)
    _Ts, params, inputs, targets, L = random_data(m.graph, opt["T"], opt["B"], opt["seed"], opt["lengths"])
    a = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    same(a, m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True, remat=2), 1e-11)


@settings(max_examples=15)
@given(cells())
def test_random_cells_windowed_equal_plain_or_are_refused(case):
    program, opt = case
    m = compile_spec(format_program(program))
    _Ts, params, inputs, targets, L = random_data(m.graph, opt["T"], opt["B"], opt["seed"], opt["lengths"])
    a = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    if remat.reason_not_windowable(m.graph) is not None:
        with pytest.raises(RnncError, match="cannot checkpoint"):
            m.loss_and_grads(params, inputs, targets, lengths=L, remat=2)
        return
    same(a, m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True, remat=2), 1e-11)


def test_the_native_target_windows_equal_plain():
    pytest.importorskip("numba", reason="the native target needs numba (pip install numba)")
    path = os.path.join(SPECS, "lstm_zoneout.rnn")  # its adjoints are arrays, not running values
    m = compile_spec(path, dims=small_dims(path), target="native")
    params, inputs, targets, L = data(m)
    a = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    same(a, m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True, remat=4))


def test_the_cupy_target_windows_equal_plain():
    from hostcuda import have_compiler, load_with_fake_cupy

    if not have_compiler():
        pytest.skip("g++ is not installed (the CuPy stand-in compiles the kernels as C++)")
    path = os.path.join(SPECS, "gru.rnn")
    dims = small_dims(path)
    mn = compile_spec(path, dims=dims)
    mc = compile_spec(path, dims=dims, target="cupy", load=False)
    mc.module = load_with_fake_cupy(mc.source)
    params, inputs, targets, L = data(mn)
    a = mn.loss_and_grads(params, inputs, targets, lengths=L)
    loss, grads = mc.loss_and_grads(params, inputs, targets, lengths=L, remat=4)
    same(a, (loss, {k: v.get() for k, v in grads.items()}), 1e-10)


def peak_bytes(f) -> int:
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_held_grows_like_the_square_root_of_T():
    """NumPy's allocations during a training step (tracemalloc traces them): plain BPTT's grow
    with T, the windows' with √T; the estimate says the same before anything is allocated."""
    m = compile_spec(os.path.join(ROOT, "bench", "specs", "lstm_layer.rnn"), dims={"I": 32, "H": 32})
    params = m.init_params(0, np.float64)
    rng = np.random.default_rng(0)
    peaks = {}
    for T in (100, 400):
        x, y = rng.standard_normal((T, 8, 32)), rng.standard_normal((T, 8, 32))
        k = remat.window_length(T)
        peaks[T] = [peak_bytes(functools.partial(m.loss_and_grads, params, {"x": x}, {"y": y}, remat=r))
                    for r in (None, k)]  # fmt: skip
        assert estimate(m, T, 8, np.float64, window=k).activations < estimate(m, T, 8, np.float64).activations / 3
    assert peaks[400][0] > 3.5 * peaks[100][0]  # plain: O(T)
    assert peaks[400][1] < 2.5 * peaks[100][1]  # windows: O(√T), 2x for 4x the steps
    assert peaks[400][1] < peaks[400][0] / 4


def test_auto_windows_only_when_a_step_would_not_fit(monkeypatch):
    from rnnc import train as tr

    task = tr.Task("text", batch=4, seq_len=400)
    m = compile_spec(os.path.join(SPECS, "lstm.rnn"), dims={**task.dims(), "H": 16})
    need = estimate(m, 400, 4, np.float32)
    monkeypatch.setenv("RNNC_MEMORY_LIMIT", str(need.total * 4))
    assert remat.choose_window(m, "auto", 400, 4, np.float32) is None
    monkeypatch.setenv("RNNC_MEMORY_LIMIT", str(need.total // 2))
    assert remat.choose_window(m, "auto", 400, 4, np.float32) == 20
    assert remat.choose_window(m, 7, 400, 4, np.float32) == 7
    t = tr.Trainer(m, task, steps=1, remat="auto")
    assert t.window == 20
    monkeypatch.setenv("RNNC_MEMORY_LIMIT", str(need.total // 200))
    with pytest.raises(RnncError, match="needs about") as e:
        tr.Trainer(m, task, steps=1)
    assert "--remat auto" in (e.value.hint or "")


def test_training_with_windows_takes_the_same_steps():
    """Truncated BPTT on text with a carry between batches: the same weights after 3 steps."""
    from rnnc import train as tr

    dims = tr.Task("text", batch=4, seq_len=20).dims()
    m = compile_spec(os.path.join(SPECS, "lstm.rnn"), dims={**dims, "H": 16})
    weights = []
    for r in (None, 6):
        t = tr.Trainer(m, tr.Task("text", batch=4, seq_len=20), steps=3, dtype=np.float64, remat=r)
        t.fit()
        weights.append(t.params)
    assert all(rel(weights[1][k], weights[0][k]) < 1e-12 for k in weights[0])


def test_the_command_line_trains_in_windows_or_says_why_not(tmp_path, capsys):
    from rnnc.cli import main

    text = os.path.join(SPECS, "lstm.rnn")
    outs = [tmp_path / "plain.npz", tmp_path / "windows.npz"]
    for out, extra in zip(outs, ([], ["--remat", "7"]), strict=True):
        assert main(["run", text, "--train", "--task", "text", "--steps", "2", "--batch", "3", "--seq-len", "30",
                     "--float64", "--quiet", "--dim", "H=8", "-o", str(out), *extra]) == 0  # fmt: skip
    a, b = (np.load(p) for p in outs)
    assert all(rel(b[k], a[k]) < 1e-12 for k in a.files)
    capsys.readouterr()
    tagger = os.path.join(SPECS, "tagger.rnn")  # a bidirectional layer
    assert main(["run", tagger, "--train", "--task", "reber", "--steps", "1", "--quiet", "--remat", "5"]) == 1
    err = capsys.readouterr().err
    assert "E585" in err and "cannot checkpoint over time" in err and "internal" not in err
    assert main(["run", text, "--train", "--task", "text", "--remat", "0"]) == 2
    assert "--remat: 0 must be at least 1" in capsys.readouterr().err


def test_check_prints_the_windows_memory_where_they_apply(capsys):
    from rnnc.cli import main

    assert main(["check", os.path.join(SPECS, "lstm.rnn")]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    plain, windows = line.split("; in 10-step windows (--remat 10) ")
    assert "a training step" in plain and windows.endswith("MiB")
    assert main(["check", os.path.join(SPECS, "birnn.rnn")]) == 0
    assert "--remat" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", [0, -3, 2.5, "auto", "7", True])
def test_a_window_that_is_no_number_of_steps_is_refused(bad):
    """From Python (the command line's argparse refuses these with exit 2): a worded error, not
    a TypeError from inside the driver or windows of one step."""
    m = compile_spec(MEAN_LOSS)
    params, inputs, targets, _ = data(m, lengths=False)
    with pytest.raises(RnncError, match="give a whole number of steps per window") as e:
        m.loss_and_grads(params, inputs, targets, remat=bad)
    assert e.value.code == "E585"
    with pytest.raises(RnncError, match="give a whole number"):
        remat.choose_window(m, bad if bad != "auto" else 0, 10, 2, np.float32)
