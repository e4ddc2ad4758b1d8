"""The library of cells and `use` (issue 12, item 5). The PyTorch-layout cells are checked
against torch.nn in test_torch_oracle.py; here every library cell is checked against the
unrolled reference and central differences, the cells PyTorch lacks against their papers'
equations written in NumPy, and imports for their mistakes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import finite_diff, random_data, reference, rel

from rnnc.compiler import compile_spec
from rnnc.errors import RnncError
from rnnc.format import format_program
from rnnc.imports import library_text
from rnnc.parse import parse

LIBRARY = sorted(c.name for c in parse(*library_text()).items)
I, H, P, T, B = 3, 4, 2, 5, 2


def model(cell: str, extra: str = "") -> str:
    width, size = ("P", "H=H, P=P") if cell == "LSTMP" else ("H", "H=H")
    return f"""use {cell}

model m {{
  dim I = {I}, H = {H}, P = {P}
  input x[I] : sequence
  target y[{width}] : sequence
  h = {extra}{cell}(x, {size})
  loss = mse(h, y)
}}"""


def test_the_library_holds_the_cells_the_issue_names():
    assert set(LIBRARY) == {"RNN", "RNNReLU", "LSTM", "LSTMP", "GRU", "PeepholeLSTM", "CIFG",
                            "LNLSTM", "MGU", "IndRNN"}  # fmt: skip


@pytest.mark.parametrize("cell", LIBRARY)
@pytest.mark.parametrize("extra", ["", "stack(2) bidirectional(sum) "])
def test_library_cells_compile_exactly(cell, extra):
    m = compile_spec(model(cell, extra))
    Ts, params, inputs, targets, L = random_data(m.graph, T, B, seed=1, lengths=True)
    ref_loss, ref_grads, _ = reference(m.graph, Ts, params, inputs, targets, L)
    loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for k in params:
        assert rel(grads[k], ref_grads[k]) < 1e-10, k
        num, idx = finite_diff(m, params, inputs, targets, k, L=L, entries=[0, params[k].size - 1])
        ana = grads[k].reshape(-1)[idx]
        assert np.linalg.norm(ana - num) <= 1e-6 * max(np.linalg.norm(num), 1e-3 * abs(loss)), k


def sig(v):
    return 1 / (1 + np.exp(-v))


def ln(v, eps=1e-5):
    c = v - v.mean(-1, keepdims=True)
    return c / np.sqrt((c * c).mean(-1, keepdims=True) + eps)


def by_hand(cell: str, p: dict, x: np.ndarray) -> np.ndarray:
    """The papers' equations, one step at a time."""
    h = c = np.zeros((x.shape[1], H))
    out = []
    for xt in x:
        if cell == "PeepholeLSTM":  # Gers, Schraudolph & Schmidhuber 2002
            z = xt @ p["h.weight_ih"].T + h @ p["h.weight_hh"].T + p["h.bias"]
            i = sig(z[:, :H] + p["h.peep_i"] * c)
            f = sig(z[:, H : 2 * H] + p["h.peep_f"] * c)
            c = f * c + i * np.tanh(z[:, 2 * H : 3 * H])
            h = sig(z[:, 3 * H :] + p["h.peep_o"] * c) * np.tanh(c)
        elif cell == "CIFG":  # Greff et al. 2017: f = 1 - i
            z = xt @ p["h.weight_ih"].T + h @ p["h.weight_hh"].T + p["h.bias"]
            i = sig(z[:, :H])
            c = (1 - i) * c + i * np.tanh(z[:, H : 2 * H])
            h = sig(z[:, 2 * H :]) * np.tanh(c)
        elif cell == "LNLSTM":  # Ba, Kiros & Hinton 2016
            z = p["h.gamma_ih"] * ln(xt @ p["h.weight_ih"].T) + p["h.gamma_hh"] * ln(h @ p["h.weight_hh"].T) \
                + p["h.bias"]  # fmt: skip
            i, f, o = sig(z[:, :H]), sig(z[:, H : 2 * H]), sig(z[:, 3 * H :])
            c = f * c + i * np.tanh(z[:, 2 * H : 3 * H])
            h = o * np.tanh(p["h.gamma_c"] * ln(c) + p["h.beta_c"])
        elif cell == "MGU":  # Zhou et al. 2016
            gi = xt @ p["h.weight_ih"].T + p["h.bias"]
            f = sig(gi[:, :H] + h @ p["h.weight_hf"].T)
            n = np.tanh(gi[:, H:] + (f * h) @ p["h.weight_hn"].T)
            h = (1 - f) * h + f * n
        elif cell == "IndRNN":  # Li et al. 2018
            h = np.maximum(xt @ p["h.weight_ih"].T + p["h.weight_hh"] * h + p["h.bias_ih"], 0)
        out.append(h)
    return np.stack(out)


@pytest.mark.parametrize("cell", ["PeepholeLSTM", "CIFG", "LNLSTM", "MGU", "IndRNN"])
def test_cells_pytorch_lacks_equal_their_papers(cell):
    m = compile_spec(model(cell))
    rng = np.random.default_rng(2)
    p = {k: rng.normal(size=v.shape) * 0.6 for k, v in m.init_params(0, np.float64).items()}
    x = rng.normal(size=(T, 3, I))
    assert rel(m.forward(p, {"x": x})["h"], by_hand(cell, p, x)) < 1e-12


def test_use_from_a_file_brings_the_cells_it_needs(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mine.rnn").write_text(
        "use GRU\n\ncell Inner(x[I]) -> h[H] {\n  param W[H, I]\n  h = tanh(W @ x + h[t-1])\n}\n\n"
        "cell Outer(x[I]) -> h[H] {\n  h = 0.5 * Inner(x, H=H) + GRU(x, H=H)\n}\n"
    )
    spec = tmp_path / "m.rnn"
    spec.write_text('use Outer from "lib/mine.rnn"\n\nmodel m {\n  dim I = 3, H = 4\n'
                    "  input x[I] : sequence\n  target y[H] : sequence\n  h = Outer(x, H=H)\n"
                    "  loss = mse(h, y)\n}\n")  # fmt: skip
    m = compile_spec(str(spec))
    assert any(k.endswith(".W") for k in m.params) and any(k.endswith(".weight_ih") for k in m.params)
    assert parse(format_program(parse(spec.read_text()))) == parse(spec.read_text())


@pytest.mark.parametrize("text, words", [
    ("use LSTM\n\ncell LSTM(x[I]) -> h[H] {\n  h = tanh(x + h[t-1])\n}\n", "1:5: 'LSTM' is defined twice: here (from rnnc's library) and at"),
    ("use LTSM\n", "1:5: rnnc's library has no cell 'LTSM'"),
    ("use GRU, Nope\n", "1:10: rnnc's library has no cell 'Nope'"),
    ('use A from "missing.rnn"\n', "1:1: use ... from \"missing.rnn\": no file"),
    ('use A from "self.rnn"\n', "the files use each other in a cycle"),
    ('use A from ""\n', "the path is empty"),
    ("use LSTM\nuse LSTM\n", "2:5: 'LSTM' is defined twice"),
])  # fmt: skip
def test_use_mistakes_are_located(tmp_path, text, words):
    spec = tmp_path / "self.rnn"
    spec.write_text(text + "\nmodel m {\n  dim I = 3, H = 4\n  input x[I] : sequence\n}\n")
    with pytest.raises(RnncError) as e:
        compile_spec(str(spec))
    assert words in f"{e.value.span.line}:{e.value.span.col}: {e.value}" or words in str(e.value)


def test_a_library_cell_shadowed_by_a_users_without_use_is_the_users():
    text = "cell LSTM(x[I]) -> h[H] {\n  param W[H, I]\n  h = tanh(W @ x + h[t-1])\n}\n\n" \
           "model m {\n  dim I = 3, H = 4\n  input x[I] : sequence\n  h = LSTM(x, H=H)\n}\n"  # fmt: skip
    assert set(compile_spec(text).params) == {"h.W"}


def test_library_text_is_formatted():
    text, file = library_text()
    assert format_program(parse(text, file)) == text
    assert os.path.basename(file) == "cells.rnn"
