"""ONNX export (issue 15, item 3): every shipped spec's forward pass as an ONNX graph that
onnx.checker accepts and that onnxruntime and onnx's reference evaluator run to rnnc's
outputs (float32, 1e-5 relative); random cells too; what cannot be exported is a located
error."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import PERMUTED_LSTM
from hypothesis import given, settings
from strategies import cells

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install '.[test]')")
ort = pytest.importorskip("onnxruntime", reason="the check needs onnxruntime (pip install '.[test]')")

from rnnc.cli import main  # noqa: E402
from rnnc.compiler import compile_spec  # noqa: E402
from rnnc.errors import RnncError  # noqa: E402
from rnnc.export import export, largest_error, random_inputs  # noqa: E402
from rnnc.format import format_program  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
ALL_SPECS = sorted(glob.glob(os.path.join(ROOT, "specs", "*.rnn")))
# attention (x[s]) is not exported: those specs are refused, located (below)
ATTENDING = [s for s in ALL_SPECS if "[s]" in Path(s).read_text()]
SPECS = [s for s in ALL_SPECS if s not in ATTENDING]


@pytest.mark.parametrize("spec", ATTENDING, ids=[os.path.basename(s) for s in ATTENDING])
def test_attention_is_refused_with_where_and_why(spec):
    m = compile_spec(spec, dims={"H": 8})
    with pytest.raises(RnncError) as e:
        export(m)
    assert e.value.code == "E581" and "attention (a read of every step s, x[s]) is not exported" in e.value.message
    line = Path(spec).read_text().splitlines()[e.value.span.line - 1]
    assert "[s]" in line[e.value.span.col - 1 :]


def onnxruntime(proto, inputs):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs), strict=True))


@pytest.mark.parametrize("spec", SPECS, ids=[os.path.basename(s) for s in SPECS])
def test_every_shipped_spec_exports_and_runs_the_same(spec):
    m = compile_spec(spec, dims={"H": 8})
    rng = np.random.default_rng(1)
    params = {k: (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in m.init_params(0).items()}
    proto = export(m, params)
    onnx.checker.check_model(proto, full_check=True)
    assert largest_error(m, proto, params, run=onnxruntime) <= 1e-5
    assert largest_error(m, proto, params) <= 1e-5  # onnx.reference.ReferenceEvaluator
    assert [o.name for o in proto.graph.output] == list(m.plans["forward"].wanted)


@settings(max_examples=12)
@given(cells(allow_lengths=False))
def test_random_cells_export_and_run_the_same(case):
    program, _ = case
    m = compile_spec(format_program(program))
    proto = export(m)
    assert largest_error(m, proto, run=onnxruntime) <= 1e-5


@pytest.mark.parametrize("body, words", [
    ("h = tanh(W @ x[t-1] + U @ h[t-1])", "cannot export"),
])  # fmt: skip
def test_what_cannot_be_exported_is_a_located_error(body, words):
    text = f"model m {{\n  dim I = 3, H = 4\n  input x[I] : sequence\n  param W[H, I], U[H, H]\n  {body}\n}}\n"
    m = compile_spec(text)
    with pytest.raises(RnncError) as e:
        export(m)
    assert words in str(e.value) and "another step" in str(e.value)
    assert e.value.span.line == 5


def test_rnnc_export_on_the_command_line(tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert main(["export", os.path.join(ROOT, "specs", "lstm.rnn"), "--dim", "H=8", "-o", out]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}:") and "reproduces rnnc's forward pass to" in said
    proto = onnx.load(out)
    assert {n.op_type for n in proto.graph.node} >= {"Scan"}


def test_without_onnx_the_refusal_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", os.path.join(ROOT, "specs", "elman.rnn"), "-o", str(tmp_path / "m.onnx")]) == 1
    assert "pip install 'rnnc[onnx]'" in capsys.readouterr().err


STOCK = {"RNN": "RNN", "LSTM": "LSTM", "GRU": "GRU"}  # RNNReLU: a Scan (see export.py)


@pytest.mark.parametrize("cell", ["RNN", "RNNReLU", "LSTM", "GRU", "LSTMP", "PeepholeLSTM", "MGU"])
@pytest.mark.parametrize("mods", ["", "stack(2) bidirectional ", "reverse "])
def test_library_cells_become_onnx_recurrent_operators(cell, mods):
    """ONNX's LSTM/GRU/RNN for the library's stock cells (gates permuted, GRU with
    linear_before_reset), a Scan for the others; both run as rnnc does."""
    size = "H=H, P=P" if cell == "LSTMP" else "H=H"
    text = f"use {cell}\n\nmodel m {{\n  dim I = 3, H = 5, P = 2\n  input x[I] : sequence\n  h = {mods}{cell}(x, {size})\n}}\n"
    m = compile_spec(text)
    rng = np.random.default_rng(2)
    params = {k: (v + 0.4 * rng.normal(size=v.shape)).astype(np.float32) for k, v in m.init_params(0).items()}
    for stock in (True, False):
        proto = export(m, params, stock=stock)
        kinds = {n.op_type for n in proto.graph.node}
        if stock and cell in STOCK:
            assert STOCK[cell] in kinds and "Scan" not in kinds
        else:
            assert "Scan" in kinds and not kinds & {"LSTM", "GRU", "RNN"}
        assert largest_error(m, proto, params, run=onnxruntime) <= 1e-5
        assert largest_error(m, proto, params) <= 1e-5


def test_a_torch_module_through_rnnc_to_onnx_runs_as_torch_does():
    torch = pytest.importorskip("torch", reason="needs torch")
    from rnnc import interop

    torch.manual_seed(3)
    mod = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True)
    model, params, _ = interop.from_torch(mod)
    proto = export(model, {k: v.astype(np.float32) for k, v in params.items()})
    x = np.random.default_rng(4).normal(size=(9, 2, 4)).astype(np.float32)
    got = onnxruntime(proto, {"x": x})["h"]
    with torch.no_grad():
        want = mod(torch.tensor(x))[0].numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert [n.op_type for n in proto.graph.node].count("LSTM") == 2


def test_a_library_cell_whose_state_is_read_elsewhere_stays_a_scan():
    """The decoder starts from the encoder's final h and c: the encoder's cell state is read
    outside it, and the decoder's start is not zero, so both run as Scans (and run right)."""
    text = "use LSTM\n\nmodel m {\n  dim I = 3, H = 4\n  input src[I] : sequence\n  input tgt[I] : sequence\n" \
           "  e = LSTM(src, H=H)\n  d = LSTM(tgt, H=H, init=final(e))\n}\n"  # fmt: skip
    m = compile_spec(text)
    proto = export(m)
    kinds = [n.op_type for n in proto.graph.node]
    assert kinds.count("Scan") == 2 and "LSTM" not in kinds
    rng = np.random.default_rng(5)
    inputs = {"src": rng.normal(size=(7, 2, 3)).astype(np.float32), "tgt": rng.normal(size=(4, 2, 3)).astype(np.float32)}
    want = m.forward(m.init_params(0), inputs)
    got = onnxruntime(proto, inputs)
    assert all(np.abs(got[k] - want[k]).max() <= 1e-5 * np.abs(want[k]).max() for k in want)


def test_a_users_cell_named_lstm_is_not_taken_for_the_librarys():
    """Same name and parameters as the library's LSTM, gates in another order: a Scan, right."""
    m = compile_spec(PERMUTED_LSTM + "\nmodel m {\n  dim I = 3, H = 4\n  input x[I] : sequence\n  h = LSTM(x, H=H)\n}\n")
    proto = export(m)
    assert "LSTM" not in {n.op_type for n in proto.graph.node}
    assert largest_error(m, proto, run=onnxruntime) <= 1e-5


@pytest.mark.parametrize("spec", SPECS, ids=[os.path.basename(s) for s in SPECS])
def test_heads_and_losses_export_with_the_targets_as_inputs(spec):
    m = compile_spec(spec, dims={"H": 8})
    rng = np.random.default_rng(3)
    params = {k: (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in m.init_params(0).items()}
    inputs = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in random_inputs(m).items()}
    targets = {}
    for name, (shape, dom, labels) in m.targets.items():
        lead = (6 >> dom.count("/"), 3) if dom != "static" else (3,)
        targets[name] = rng.integers(0, shape[0], size=lead) if labels else rng.normal(size=lead + shape).astype(np.float32)
    proto = export(m, params, loss=True)
    want = m.loss(params, inputs, targets)
    from onnx.reference import ReferenceEvaluator

    for got in (onnxruntime(proto, {**inputs, **targets}),
                dict(zip((ev := ReferenceEvaluator(proto)).output_names,
                         ev.run(None, {**inputs, **targets}), strict=True))):  # fmt: skip
        assert set(got) == set(want)
        for k in want:
            assert np.linalg.norm(got[k] - want[k]) <= 1e-5 * np.linalg.norm(want[k]), k


@pytest.mark.parametrize("head", ["0.5 * softmax(Wy @ h) + 0.5 * softmax(Vy @ h)", "sigmoid(Wy @ h)", "softmax(Wy @ h)"],
                         ids=["probabilities", "sigmoid", "softmax"])  # fmt: skip
def test_each_cross_entropy_exports(head):
    text = f"model m {{\n  dim I = 3, H = 4, K = 5\n  input x[I] : sequence\n  target y : sequence of class(K)\n" \
           f"  param W[H, I], U[H, H], Wy[K, H], Vy[K, H]\n  h = tanh(W @ x + U @ h[t-1])\n" \
           f"  loss = cross_entropy({head}, y)\n}}\n"  # fmt: skip
    m = compile_spec(text)
    ops = {d["op"] for _, d in m.plans["loss"].graph.nodes(data=True)}
    assert ops & {"ce_probs", "ce_sigmoid", "ce_logits"}
    rng = np.random.default_rng(4)
    params = m.init_params(0)
    proto = export(m, params, loss=True)
    for B in (3, 1):  # one sequence: no axis of size 1 may be squeezed away but the label's
        inputs, targets = random_inputs(m, B=B), {"y": rng.integers(0, 5, size=(6, B))}
        want = m.loss(params, inputs, targets)["loss"]
        got = onnxruntime(proto, {**inputs, **targets})["loss"]
        assert np.shape(got) == () and abs(got - want) <= 1e-5 * abs(want)


def test_export_with_trained_params_and_the_loss_on_the_command_line(tmp_path, capsys):
    spec = os.path.join(ROOT, "specs", "elman.rnn")
    m = compile_spec(spec, dims={"H": 8})
    rng = np.random.default_rng(6)
    params = {k: (v + 0.5 * rng.normal(size=v.shape)).astype(np.float32) for k, v in m.init_params(0).items()}
    np.savez(tmp_path / "p.npz", **{f"param/{k}": v for k, v in params.items()})
    out = str(tmp_path / "m.onnx")
    assert main(["export", spec, "--dim", "H=8", "--params", str(tmp_path / "p.npz"), "--loss", "-o", out]) == 0
    assert "outputs s, o, loss" in capsys.readouterr().out
    inputs, targets = random_inputs(m), {"y": rng.integers(0, 27, size=(6, 3))}
    proto = onnx.load(out)
    got, want = onnxruntime(proto, {**inputs, **targets}), m.loss(params, inputs, targets)
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"])  # the file holds those weights


def test_a_per_sequence_score_for_per_step_labels_is_refused():
    text = "model m {\n  dim I = 3, K = 4\n  input x[I] : sequence\n  input img[I] : static\n" \
           "  target y : sequence of class(K)\n  param W[K, I], U[K, I]\n  h = tanh(U @ x)\n" \
           "  loss = cross_entropy(softmax(W @ img), y) + cross_entropy(softmax(h), y)\n}\n"  # fmt: skip
    m = compile_spec(text)
    with pytest.raises(RnncError, match="a per-sequence score read by per-step labels is not exported"):
        export(m, loss=True)


def test_a_graph_the_reference_evaluator_cannot_run_is_refused_in_words(tmp_path, capsys, monkeypatch):
    import rnnc.export as ex

    def broken(*a, **k):
        raise NotImplementedError("no such operator")

    monkeypatch.setattr(ex, "largest_error", broken)
    out = tmp_path / "m.onnx"
    assert main(["export", os.path.join(ROOT, "specs", "elman.rnn"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error[E582]" in err and "NotImplementedError: no such operator" in err and not out.exists()
