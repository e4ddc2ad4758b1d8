"""Dropout and zoneout (issue 12, item 3): masks drawn from a Generator the module is given,
per step or per sequence; evaluation without one (dropout off, zoneout at its expectation);
gradients exact for the drawn masks (PyTorch in float64 with the same masks); training draws
them for the whole batch from the run's generator, so a resumed run is bit-identical."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import rel

from rnnc import train
from rnnc.compiler import compile_spec
from rnnc.errors import RnncError

ROOT = os.path.join(os.path.dirname(__file__), "..")
DROPOUT = os.path.join(ROOT, "specs", "lstm_dropout.rnn")
ZONEOUT = os.path.join(ROOT, "specs", "lstm_zoneout.rnn")


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def batch(m, T=7, B=5, seed=0):
    rng = np.random.default_rng(seed)
    V = m.inputs["x"][0][0]
    x = np.eye(V)[rng.integers(0, V, size=(T, B))]
    return {"x": x}, {"y": rng.integers(0, V, size=(T, B))}


def test_masks_have_the_drawn_statistics():
    m = compile_spec(DROPOUT, dims={"H": 50})
    z = compile_spec(ZONEOUT, dims={"H": 50})
    ins, _ = batch(m, T=40, B=64)
    masks = {**m.draw_masks(ins, np.random.default_rng(0)), **z.draw_masks(ins, np.random.default_rng(1))}
    assert masks["h.z.dropout"].shape == (64, 50)  # per sequence: [B, H]
    assert masks["h.z.dropout2"].shape == (64, 27)
    assert masks["h.c.zoneout"].shape == (40, 64, 50)  # per step: [T, B, H]
    for name, p in (("h.z.dropout", 0.25), ("h.z.dropout2", 0.1), ("loss.dropout", 0.25)):
        v = masks[name]
        assert set(np.unique(v)) == {0.0, 1 / (1 - p)}, name
        assert abs((v == 0).mean() - p) < 0.02, name
    for name, p in (("h.c.zoneout", 0.15), ("h.h.zoneout", 0.05)):
        assert set(np.unique(masks[name])) == {0.0, 1.0}
        assert abs(masks[name].mean() - p) < 0.01, name


def test_a_seeded_generator_reproduces_the_masks_and_evaluation_draws_none():
    m = compile_spec(DROPOUT, dims={"H": 8})
    p = m.init_params(0, np.float64)
    ins, tgs = batch(m)
    a = m.loss_and_grads(p, ins, tgs, rng=np.random.default_rng(3))[0]
    b = m.loss_and_grads(p, ins, tgs, rng=np.random.default_rng(3))[0]
    c = m.loss_and_grads(p, ins, tgs, rng=np.random.default_rng(4))[0]
    assert a == b and a != c
    # evaluation: the same model with every dropout removed
    plain = read(DROPOUT).replace("dropout(h[t-1], 0.25, per=sequence)", "h[t-1]") \
        .replace("dropout(x, 0.1, per=sequence)", "x").replace("dropout(h, 0.25, per=sequence)", "h")  # fmt: skip
    assert "dropout" not in plain.split("}", 1)[1].replace("char_lstm_dropout", "")
    q = compile_spec(plain, dims={"H": 8})
    assert m.loss(p, ins, tgs)["loss"] == pytest.approx(q.loss(p, ins, tgs)["loss"], rel=1e-14)
    assert m.loss(p, ins, tgs)["loss"] != m.loss(p, ins, tgs, rng=np.random.default_rng(3))["loss"]


def test_zoneout_evaluates_at_its_expectation():
    z = compile_spec(ZONEOUT, dims={"H": 8})
    text = read(ZONEOUT)
    expected = text.replace("c = zoneout(f * c[t-1] + i * g, 0.15)", "c = 0.15 * c[t-1] + 0.85 * (f * c[t-1] + i * g)") \
        .replace("h = zoneout(o * tanh(c), 0.05)", "h = 0.05 * h[t-1] + 0.95 * (o * tanh(c))")  # fmt: skip
    e = compile_spec(expected, dims={"H": 8})
    p = z.init_params(1, np.float64)
    ins, tgs = batch(z)
    l1, g1 = z.loss_and_grads(p, ins, tgs)
    l2, g2 = e.loss_and_grads(p, ins, tgs)
    assert l1 == pytest.approx(l2, rel=1e-14)
    for k in g1:
        assert rel(g1[k], g2[k]) < 1e-13, k


def torch_lstm_loss(torch, p, x, y, masks, zoneout=False):
    """The LSTM of specs/lstm_dropout.rnn (or lstm_zoneout.rnn) written in torch, with the
    given masks."""
    P = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    T, B, _ = x.shape
    H = P["h.bf"].shape[0]
    h = c = torch.zeros(B, H, dtype=torch.float64)
    m = {k: torch.tensor(v) for k, v in masks.items()}
    total = 0
    for t in range(T):
        xt = torch.tensor(x[t])
        z = torch.cat([h, xt], -1) if zoneout else torch.cat([h * m["h.z.dropout"], xt * m["h.z.dropout2"]], -1)
        f = torch.sigmoid(z @ P["h.Wf"].T + P["h.bf"])
        i = torch.sigmoid(z @ P["h.Wi"].T + P["h.bi"])
        g = torch.tanh(z @ P["h.Wg"].T + P["h.bg"])
        o = torch.sigmoid(z @ P["h.Wo"].T + P["h.bo"])
        c_new = f * c + i * g
        c = m["h.c.zoneout"][t] * c + (1 - m["h.c.zoneout"][t]) * c_new if zoneout else c_new
        h_new = o * torch.tanh(c)
        h = m["h.h.zoneout"][t] * h + (1 - m["h.h.zoneout"][t]) * h_new if zoneout else h_new
        out = h if zoneout else h * m["loss.dropout"]
        logits = out @ P["Wy"].T + P["by"]
        total = total + torch.nn.functional.cross_entropy(logits, torch.tensor(y[t]), reduction="sum")
    loss = total / B
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in P.items()}


@pytest.mark.parametrize("spec", [DROPOUT, ZONEOUT], ids=["variational-dropout", "zoneout"])
def test_gradients_for_the_drawn_masks_equal_torch(spec):
    torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install '.[test]')")
    m = compile_spec(spec, dims={"H": 6})
    rng = np.random.default_rng(5)
    p = {k: v + 0.2 * rng.normal(size=v.shape) for k, v in m.init_params(0, np.float64).items()}
    ins, tgs = batch(m, T=6, B=4)
    masks = m.draw_masks(ins, np.random.default_rng(6))
    loss, grads = m.loss_and_grads(p, {**ins, **masks}, tgs)
    # the masks given in inputs are the ones a generator with that seed draws
    assert loss == m.loss_and_grads(p, ins, tgs, rng=np.random.default_rng(6))[0]
    tl, tg = torch_lstm_loss(torch, p, ins["x"], tgs["y"], masks, zoneout=spec == ZONEOUT)
    assert abs(loss - tl) <= 1e-12 * abs(tl)
    for k in p:
        assert rel(grads[k], tg[k]) < 1e-10, k


def test_training_draws_masks_and_validation_does_not():
    data = train.Task("text", 4, 12)
    m = compile_spec(DROPOUT, dims={"H": 8, **data.dims()})
    seen = []
    real = m.loss_and_grads

    def spy(params, ins, tgs, **kw):
        seen.append(sorted(k for k in ins if k in m.masks))
        return real(params, ins, tgs, **kw)

    m.loss_and_grads = spy
    t = train.Trainer(m, data, train.Adam(1e-2), steps=3, seed=0, dtype=np.float64)
    t.fit()
    assert seen == [sorted(m.masks)] * 3
    assert t.validate() == t.validate()  # evaluation: no masks, deterministic


def test_a_resumed_run_with_dropout_is_bit_identical(tmp_path):
    m = compile_spec(ZONEOUT, dims={"H": 8, **train.Task("text", 4, 10).dims()})
    make = lambda steps, **kw: train.Trainer(m, train.Task("text", 4, 10), train.Adam(1e-2),  # noqa: E731
                                             steps=steps, seed=2, dtype=np.float64, **kw)  # fmt: skip
    whole = make(12)
    whole.fit()
    ck = str(tmp_path / "ck.npz")
    make(6, checkpoint=ck).fit()
    resumed = make(12, checkpoint=ck, resume=True)
    resumed.fit()
    for k in whole.params:
        assert np.array_equal(whole.params[k], resumed.params[k]), k


SPEC = """model m {{
  dim I = 3, H = 4
  input x[I] : sequence
  target y[H] : sequence
  param W[H, I], U[H, H], h0[H]
  {body}
  loss = mse(h, y)
}}"""


@pytest.mark.parametrize("body, words", [
    ("h = tanh(dropout(W @ x, 1.0) + U @ h[t-1])", "dropout: p = 1 is outside [0, 1)"),
    ("h = tanh(dropout(W @ x) + U @ h[t-1])", "dropout takes 2 arguments (a value and p), got 1"),
    ("h = tanh(dropout(W @ x, H) + U @ h[t-1])", "dropout: 'p' must be a number"),
    ("h = tanh(dropout(W @ x, 0.1, per=batch) + U @ h[t-1])", "dropout: per=batch is neither step nor sequence"),
    ("h = tanh(zoneout(W @ x, 0.1, per=sequence) + U @ h[t-1])", "zoneout takes no argument 'per'"),
    ("h = tanh(W @ x + U @ h[t-1] + dropout(h0, 0.5))", "dropout of a model-wide value (a param)"),
])  # fmt: skip
def test_noise_mistakes_are_located(body, words):
    with pytest.raises(RnncError) as e:
        compile_spec(SPEC.format(body=body))
    assert words in str(e.value)


def test_a_given_mask_of_the_wrong_shape_is_named():
    m = compile_spec(DROPOUT, dims={"H": 8})
    ins, tgs = batch(m)
    with pytest.raises(ValueError, match=r"inputs\['h.z.dropout'\] \(a dropout mask\) has shape \[5, 3\]"):
        m.loss(m.init_params(0), {**ins, "h.z.dropout": np.ones((5, 3))}, tgs)


@pytest.mark.parametrize("recurrence, previous", [
    ("h = zoneout(tanh(W @ x + U @ h[t-1]), 0.3)", "h[t-1]"),
    ("h = zoneout(tanh(W @ x + U @ h[t+1]), 0.3)", "h[t+1]"),  # a backward recurrence
])  # fmt: skip
@pytest.mark.parametrize("mods", ["", "reverse "])
def test_zoneout_keeps_the_previous_step_of_the_direction_it_runs(recurrence, previous, mods):
    cell = "cell C(x[I]) -> h[H] {{\n  param W[H, I], U[H, H]\n  {}\n}}\n"
    model = "model m {\n  dim I = 3, H = 4\n  input x[I] : sequence\n  target y[H] : sequence\n" \
            f"  h = {mods}C(x, H=H)\n  loss = mse(h, y)\n}}"  # fmt: skip
    expect = recurrence.replace("zoneout(", f"0.3 * {previous} + 0.7 * (").replace(", 0.3)", ")")
    a = compile_spec(cell.format(recurrence) + model)
    b = compile_spec(cell.format(expect) + model)
    rng = np.random.default_rng(0)
    p = {k: rng.normal(size=v.shape) for k, v in a.init_params(0, np.float64).items()}
    ins, tgs = {"x": rng.normal(size=(5, 2, 3))}, {"y": rng.normal(size=(5, 2, 4))}
    la, ga = a.loss_and_grads(p, ins, tgs)
    lb, gb = b.loss_and_grads(p, ins, tgs)
    assert la == pytest.approx(lb, rel=1e-14)
    for k in ga:
        assert rel(ga[k], gb[k]) < 1e-13


@pytest.mark.parametrize("spec", [DROPOUT, ZONEOUT], ids=["variational-dropout", "zoneout"])
@pytest.mark.parametrize("given", [False, True], ids=["evaluation", "masks-given"])
def test_the_unrolled_reference_agrees_in_both_modes(spec, given):
    from helpers import random_data, reference

    m = compile_spec(spec, dims={"H": 3, "V": 4})
    Ts, params, inputs, targets, _ = random_data(m.graph, 4, 2, seed=1)
    if not given:
        inputs = {k: v for k, v in inputs.items() if k not in m.masks}
    ref_loss, ref_grads, _ = reference(m.graph, Ts, params, inputs, targets)
    loss, grads = m.loss_and_grads(params, inputs, targets)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for k in params:
        assert rel(grads[k], ref_grads[k]) < 1e-10, k
