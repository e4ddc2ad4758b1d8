"""Reductions over features, broadcasting, roots and normalization (issue 12, items 1-2),
checked against oracles that share no code with rnnc: PyTorch in float64 for every feature
op inside a recurrence (outputs to 1e-12, gradients to 1e-10), and a hand-written NumPy
layer-normalized LSTM (Ba et al. 2016) for the shipped spec."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import rel

from rnnc.compiler import compile_spec
from rnnc.errors import RnncError

ROOT = os.path.join(os.path.dirname(__file__), "..")
I, H, T, B = 3, 5, 5, 3

# rnnc's expression over a = W @ x + U @ h[t-1], and the same in torch (a: [B, H])
FORMS = {
    "a - mean(a)": lambda t, a: a - a.mean(-1, keepdim=True),
    "a / sqrt(var(a) + 1)": lambda t, a: a / t.sqrt(a.var(-1, unbiased=False, keepdim=True) + 1),
    "a * rsqrt(var(a) + 0.5)": lambda t, a: a / t.sqrt(a.var(-1, unbiased=False, keepdim=True) + 0.5),
    "a - max(a) + min(a)": lambda t, a: a - a.amax(-1, keepdim=True) + a.amin(-1, keepdim=True),
    "a * sum(a) / H": lambda t, a: a * a.sum(-1, keepdim=True) / H,
    "a + 1 / H - I": lambda t, a: a + 1 / H - I,
    "clip(a, -0.5, 0.5)": lambda t, a: t.clamp(a, -0.5, 0.5),
    "minimum(a, 0.2) + maximum(a, -0.1)": lambda t, a: t.clamp(a, max=0.2) + t.clamp(a, min=-0.1),
    "abs(a) * 0.5": lambda t, a: a.abs() * 0.5,
    "square(a) * 0.1": lambda t, a: a.square() * 0.1,
    "sqrt(1 + square(a)) - 1": lambda t, a: t.sqrt(1 + a * a) - 1,
    "layernorm(a)": lambda t, a: t.nn.functional.layer_norm(a, (H,), eps=1e-5),
    "layernorm(a, eps=0.1)": lambda t, a: t.nn.functional.layer_norm(a, (H,), eps=0.1),
    "rmsnorm(a)": lambda t, a: a / t.sqrt((a * a).mean(-1, keepdim=True) + 1e-5),
    "rmsnorm(a, eps=0.5) * mean(a)": lambda t, a: a / t.sqrt((a * a).mean(-1, keepdim=True) + 0.5)
    * a.mean(-1, keepdim=True),
}


def form_spec(form: str) -> str:
    return f"""model m {{
  dim I = {I}, H = {H}
  input x[I] : sequence
  target y[H] : sequence
  param W[H, I], U[H, H], g[H]
  a = W @ x + U @ h[t-1]
  h = tanh(g * ({form}))
  loss = mse(h, y)
}}"""


@pytest.mark.parametrize("form", FORMS)
def test_feature_ops_in_a_recurrence_equal_torch(form):
    torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install '.[test]')")
    m = compile_spec(form_spec(form))
    rng = np.random.default_rng(1)
    params = {"W": rng.normal(size=(H, I)), "U": rng.normal(size=(H, H)) * 0.7,
              "g": rng.normal(size=H) + 1.0}  # fmt: skip
    x, y = rng.normal(size=(T, B, I)), rng.normal(size=(T, B, H))
    loss, grads = m.loss_and_grads(params, {"x": x}, {"y": y}, with_inputs=True)
    h_out = m.forward(params, {"x": x})["h"]

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    h = torch.zeros(B, H, dtype=torch.float64)
    hs = []
    for t in range(T):
        a = tx[t] @ tp["W"].T + h @ tp["U"].T
        h = torch.tanh(tp["g"] * FORMS[form](torch, a))
        hs.append(h)
    hs = torch.stack(hs)
    tloss = ((hs - torch.tensor(y)) ** 2).mean(-1).sum(0).mean()
    tloss.backward()
    assert abs(loss - tloss.item()) <= 1e-12 * abs(tloss.item())
    assert rel(h_out, hs.detach().numpy()) < 1e-12
    for k, v in tp.items():
        assert rel(grads[k], v.grad.numpy()) < 1e-10, k
    assert rel(grads["x"], tx.grad.numpy()) < 1e-10


def ln(v, eps=1e-5):
    mu = v.mean(axis=-1, keepdims=True)
    var = ((v - mu) ** 2).mean(axis=-1, keepdims=True)
    return (v - mu) / np.sqrt(var + eps)


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def ln_lstm_by_hand(p, x, lengths=None):
    """Ba, Kiros & Hinton (2016), eq. 20-22, written out in NumPy: per-step h, and the
    cross-entropy of softmax(Wy h + by), summed over each sequence's steps, mean over the batch."""
    Tn, Bn, _ = x.shape
    Hn = p["h.Wh"].shape[1]
    h, c = np.zeros((Bn, Hn)), np.zeros((Bn, Hn))
    hs = np.zeros((Tn, Bn, Hn))
    for t in range(Tn):
        z = p["h.ax"] * ln(x[t] @ p["h.Wx"].T) + p["h.ah"] * ln(h @ p["h.Wh"].T) + p["h.b"]
        f, i, o = sigmoid(z[:, :Hn]), sigmoid(z[:, Hn : 2 * Hn]), sigmoid(z[:, 2 * Hn : 3 * Hn])
        g = np.tanh(z[:, 3 * Hn :])
        c_new = f * c + i * g
        h_new = o * np.tanh(p["h.ac"] * ln(c_new) + p["h.bc"])
        keep = np.ones((Bn, 1), bool) if lengths is None else (t < lengths)[:, None]
        h, c = np.where(keep, h_new, h), np.where(keep, c_new, c)
        hs[t] = np.where(keep, h_new, 0)
    return hs


def test_ln_lstm_spec_equals_the_paper_written_in_numpy():
    m = compile_spec(os.path.join(ROOT, "specs", "ln_lstm.rnn"), dims={"H": 6})
    rng = np.random.default_rng(2)
    p = {k: v + 0.3 * rng.normal(size=v.shape) for k, v in m.init_params(0, np.float64).items()}
    V = p["Wy"].shape[0]
    x = rng.normal(size=(7, 4, V))
    y = rng.integers(0, V, size=(7, 4))
    lengths = np.array([7, 3, 5, 1])
    for L in (None, lengths):
        hs = ln_lstm_by_hand(p, x, L)
        out = m.forward(p, {"x": x}, lengths=None if L is None else {"x": L})
        got = np.where((np.arange(7)[:, None] < (7 if L is None else L))[..., None], out["h"], 0)
        assert rel(got, hs) < 1e-12
        logits = hs @ p["Wy"].T + p["by"]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)  # fmt: skip
        nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
        mask = np.arange(7)[:, None] < (7 if L is None else L)
        want = (nll * mask).sum(0).mean()
        loss, _ = m.loss_and_grads(p, {"x": x}, {"y": y}, lengths=None if L is None else {"x": L})
        assert abs(loss - want) <= 1e-12 * want


def test_ln_lstm_gradients_equal_torch():
    torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install '.[test]')")
    F = torch.nn.functional
    m = compile_spec(os.path.join(ROOT, "specs", "ln_lstm.rnn"), dims={"H": 6})
    rng = np.random.default_rng(3)
    p = {k: v + 0.3 * rng.normal(size=v.shape) for k, v in m.init_params(0, np.float64).items()}
    V, Hn = p["Wy"].shape
    x, y = rng.normal(size=(6, 3, V)), rng.integers(0, V, size=(6, 3))
    loss, grads = m.loss_and_grads(p, {"x": x}, {"y": y})
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    h = c = torch.zeros(3, Hn, dtype=torch.float64)
    total = 0
    for t in range(6):
        xt = torch.tensor(x[t])
        z = tp["h.ax"] * F.layer_norm(xt @ tp["h.Wx"].T, (4 * Hn,)) \
            + tp["h.ah"] * F.layer_norm(h @ tp["h.Wh"].T, (4 * Hn,)) + tp["h.b"]  # fmt: skip
        f, i, o, g = z.split(Hn, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(tp["h.ac"] * F.layer_norm(c, (Hn,)) + tp["h.bc"])
        total = total + F.cross_entropy(h @ tp["Wy"].T + tp["by"], torch.tensor(y[t]), reduction="sum")
    (total / 3).backward()
    assert abs(loss - total.item() / 3) <= 1e-12 * abs(loss)
    for k, v in tp.items():
        assert rel(grads[k], v.grad.numpy()) < 1e-10, k


@pytest.mark.parametrize("body, words", [
    ("h = tanh(W @ x + H[t-1])", "'H' is a dimension: it has no time steps to read"),
    ("h = tanh(W @ x + avg(x))", "unknown function 'avg'"),
    ("h = tanh(W @ x + mean(W))", "mean: expects a vector, got [5, 3]"),
    ("h = tanh(W @ x + layernorm(x, eps=H))", "layernorm: 'eps' must be a number"),
    ("h = tanh(W @ x + sum(x, 2))", "sum takes 1 argument, got 2"),
])  # fmt: skip
def test_feature_op_mistakes_are_located(body, words):
    text = f"model m {{\n  dim I = {I}, H = {H}\n  input x[I] : sequence\n  target y[H] : sequence\n" \
           f"  param W[H, I]\n  {body}\n  loss = mse(h, y)\n}}"  # fmt: skip
    with pytest.raises(RnncError) as e:
        compile_spec(text)
    assert words in str(e.value)


def test_the_adjoint_of_a_reduction_has_its_operands_shape():
    """x reaches the loss only through mean(x): dx is [T, B, I], each feature 1/I of dmean."""
    torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install '.[test]')")
    text = form_spec("a").replace("a = W @ x + U @ h[t-1]", "a = U @ h[t-1] + W @ g * mean(x)")
    m = compile_spec(text.replace("param W[H, I]", "param W[H, H]"))
    rng = np.random.default_rng(4)
    params = {"W": rng.normal(size=(H, H)), "U": rng.normal(size=(H, H)), "g": rng.normal(size=H)}
    x, y = rng.normal(size=(T, B, I)), rng.normal(size=(T, B, H))
    _, grads = m.loss_and_grads(params, {"x": x}, {"y": y}, with_inputs=True)
    tp = {k: torch.tensor(v) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    h, total = torch.zeros(B, H, dtype=torch.float64), 0
    for t in range(T):
        a = h @ tp["U"].T + (tp["W"] @ tp["g"]) * tx[t].mean(-1, keepdim=True)
        h = torch.tanh(tp["g"] * a)
        total = total + ((h - torch.tensor(y[t])) ** 2).mean(-1).sum()
    (total / B).backward()
    assert grads["x"].shape == x.shape
    assert rel(grads["x"], tx.grad.numpy()) < 1e-10
