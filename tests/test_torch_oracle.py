"""PyTorch in float64 as an oracle that shares no code with rnnc, for the library's cells
(rnnc/cells.rnn, brought in with `use`): nn.RNN (tanh, relu),
nn.LSTM (with proj_size), nn.GRU in its own packed layout, bidirectional, two layers,
variable lengths through pack_padded_sequence, and a many-to-one classifier. Outputs (padding
zeroed), final states h_n / c_n, and the gradients of every weight, the input and the initial
states agree norm-wise: outputs to 1e-12, gradients to 1e-10."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import rel

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install '.[test]')")
nn = torch.nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from rnnc.compiler import compile_spec  # noqa: E402

I, H, P, T, B = 3, 4, 2, 6, 3
# torch.nn module kinds -> the library cell that holds its weights one to one
CELLS = {"RNN_TANH": "RNN", "RNN_RELU": "RNNReLU", "LSTM": "LSTM", "LSTM_PROJ": "LSTMP", "GRU": "GRU"}


def torch_module(kind: str, layers: int, bidir: bool):
    torch.manual_seed(0)
    kw = dict(input_size=I, hidden_size=H, num_layers=layers, bidirectional=bidir, dtype=torch.float64)  # fmt: skip
    if kind.startswith("RNN"):
        return nn.RNN(nonlinearity=kind[4:].lower(), **kw)
    if kind.startswith("LSTM"):
        return nn.LSTM(proj_size=P if kind == "LSTM_PROJ" else 0, **kw)
    return nn.GRU(**kw)


def spec(kind: str, layers: int, bidir: bool) -> str:
    mods = (f"stack({layers}) " if layers > 1 else "") + ("bidirectional " if bidir else "")
    width = P if kind == "LSTM_PROJ" else H
    dims = f"dim I = {I}, H = {H}" + (f", P = {P}" if kind == "LSTM_PROJ" else "")
    size = "H=H, P=P" if kind == "LSTM_PROJ" else "H=H"
    return f"""use {CELLS[kind]}

model m {{
  {dims}
  input x[I] : sequence
  target y[{width * (2 if bidir else 1)}] : sequence
  h = {mods}{CELLS[kind]}(x, {size})
  loss = mse(h, y)
}}"""


def prefix(layers: int, bidir: bool, k: int, d: int) -> str:
    p = "h" + (f".l{k + 1}" if layers > 1 else "")
    return p + ((".fwd", ".bwd")[d] if bidir else "")


def params_from(mod, layers: int, bidir: bool) -> dict[str, np.ndarray]:
    out = {}
    for name, t in mod.named_parameters():
        base, _, rest = name.rpartition("_l")
        k = int(rest.split("_")[0])
        d = 1 if rest.endswith("_reverse") else 0
        out[f"{prefix(layers, bidir, k, d)}.{base}"] = t.detach().numpy().copy()
    return out


def state_names(kind: str, layers: int, bidir: bool) -> list[tuple[str, int, str]]:
    """(rnnc initial-state input, index into torch's h0/c0, 'h' or 'c')."""
    out = []
    for k in range(layers):
        for d in range(2 if bidir else 1):
            p = prefix(layers, bidir, k, d)
            out.append((f"{p}.h.init", k * (2 if bidir else 1) + d, "h"))
            if kind.startswith("LSTM"):
                out.append((f"{p}.c.init", k * (2 if bidir else 1) + d, "c"))
    return out


CASES = [(k, 1, False) for k in CELLS] + [(k, 2, False) for k in ("LSTM", "GRU", "RNN_TANH")] + \
    [(k, 1, True) for k in ("LSTM", "GRU", "RNN_TANH", "LSTM_PROJ")] + [("LSTM", 2, True), ("GRU", 2, True)]  # fmt: skip


def case_errors(kind: str, layers: int, bidir: bool, lengths: bool) -> dict[str, float]:
    """rnnc against PyTorch on one case: the largest norm-wise error of each kind of value
    (bench/oracle_errors.py prints them over all cases)."""
    mod = torch_module(kind, layers, bidir)
    m = compile_spec(spec(kind, layers, bidir))
    params = params_from(mod, layers, bidir)
    assert set(params) == set(m.params)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(T, B, I))
    D = 2 if bidir else 1
    width = P if kind == "LSTM_PROJ" else H
    y = rng.normal(size=(T, B, width * D))
    h0 = rng.normal(size=(layers * D, B, width)) * 0.5
    c0 = rng.normal(size=(layers * D, B, H)) * 0.5
    L = np.array([T, 2, 4]) if lengths else np.full(B, T)

    # PyTorch, float64
    xt = torch.tensor(x, requires_grad=True)
    h0t, c0t = torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True)
    state = (h0t, c0t) if kind.startswith("LSTM") else h0t
    packed = pack_padded_sequence(xt, torch.tensor(L), enforce_sorted=False)
    out_p, fin = mod(packed, state)
    out, _ = pad_packed_sequence(out_p, total_length=T)
    mask = torch.tensor(np.arange(T)[:, None] < L[None, :], dtype=torch.float64)
    # rnnc's mse: mean over features, sum over valid steps, mean over the batch
    loss_t = ((((out - torch.tensor(y)) ** 2).mean(-1) * mask).sum(0)).mean()
    loss_t.backward()

    # rnnc
    inputs = {"x": x}
    for name, i, which in state_names(kind, layers, bidir):
        inputs[name] = (h0 if which == "h" else c0)[i]
    lens = {"x": L} if lengths else None
    loss, grads, carry = m.loss_and_grads(params, inputs, {"y": y}, lengths=lens,
                                          with_inputs=True, return_carry=True)  # fmt: skip
    o = m.forward(params, inputs, lengths=lens)["h"]

    errors = {"output": rel(o, out.detach().numpy()),  # padding zeroed like pad_packed_sequence
              "loss": abs(loss - loss_t.item()) / abs(loss)}  # fmt: skip
    g = [rel(grads["x"], xt.grad.numpy())]
    for tname, t in mod.named_parameters():
        base, _, rest = tname.rpartition("_l")
        k, d = int(rest.split("_")[0]), 1 if rest.endswith("_reverse") else 0
        g.append(rel(grads[f"{prefix(layers, bidir, k, d)}.{base}"], t.grad.numpy()))
    for name, i, which in state_names(kind, layers, bidir):
        g.append(rel(grads[name], (h0t if which == "h" else c0t).grad.numpy()[i]))
    errors["gradient"] = max(g)
    # final states: the forward direction's carry is each sequence's state at its length;
    # the backward direction ends at step 0 of its output
    h_n = (fin[0] if kind.startswith("LSTM") else fin).detach().numpy()
    f = [rel(carry[f"{prefix(layers, bidir, k, 0)}.h"][-1], h_n[k * D]) for k in range(layers)]
    if kind.startswith("LSTM"):
        c_n = fin[1].detach().numpy()
        f += [rel(carry[f"{prefix(layers, bidir, k, 0)}.c"][-1], c_n[k * D]) for k in range(layers)]
    if bidir:
        f.append(rel(o[0, :, width:], h_n[-1]))
    errors["final state"] = max(f)
    return errors


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "packed"])
@pytest.mark.parametrize("kind,layers,bidir", CASES, ids=[f"{k}-{n}{'-bi' if b else ''}" for k, n, b in CASES])
def test_outputs_final_states_and_gradients_equal_pytorch(kind, layers, bidir, lengths):
    e = case_errors(kind, layers, bidir, lengths)
    assert e["output"] < 1e-12 and e["loss"] < 1e-12 and e["final state"] < 1e-12, e
    assert e["gradient"] < 1e-10, e


def test_many_to_one_classifier_equals_pytorch():
    K = 3
    text = f"""use LSTM

model m {{
  dim I = {I}, H = {H}, K = {K}
  input x[I] : sequence
  target label : class(K)
  param Wy[K, H], by[K]
  h = LSTM(x, H=H)
  loss = cross_entropy(softmax(Wy @ last(h) + by), label)
}}"""
    m = compile_spec(text)
    mod = torch_module("LSTM", 1, False)
    torch.manual_seed(1)
    head = nn.Linear(H, K, dtype=torch.float64)
    params = params_from(mod, 1, False)
    params["Wy"], params["by"] = head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy()
    rng = np.random.default_rng(2)
    x, label, L = rng.normal(size=(T, B, I)), rng.integers(0, K, size=B), np.array([T, 3, 1])
    xt = torch.tensor(x, requires_grad=True)
    _, (h_n, _) = mod(pack_padded_sequence(xt, torch.tensor(L), enforce_sorted=False))
    loss_t = nn.functional.cross_entropy(head(h_n[-1]), torch.tensor(label))
    loss_t.backward()
    loss, grads = m.loss_and_grads(params, {"x": x}, {"label": label}, lengths={"x": L},
                                   with_inputs=True)  # fmt: skip
    assert abs(loss - loss_t.item()) < 1e-12 * abs(loss)
    assert rel(grads["Wy"], head.weight.grad.numpy()) < 1e-10
    assert rel(grads["by"], head.bias.grad.numpy()) < 1e-10
    assert rel(grads["x"], xt.grad.numpy()) < 1e-10
    for tname, t in mod.named_parameters():
        assert rel(grads["h." + tname.rpartition("_l")[0]], t.grad.numpy()) < 1e-10, tname


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_learned_initial_states_equal_pytorch(kind):
    """init=learned: a param per state, layer and direction (h.l1.bwd.c0), broadcast over the
    batch; its gradient is PyTorch's for h0/c0 = param.expand(B) (summed over the batch)."""
    layers, bidir, D = 2, True, 2
    mod = torch_module(kind, layers, bidir)
    m = compile_spec(spec(kind, layers, bidir).replace("(x, H=H)", "(x, H=H, init=learned)"))
    params = params_from(mod, layers, bidir)
    rng = np.random.default_rng(5)
    starts = {name[:-5] + "0": rng.normal(size=H) * 0.5 for name, _, _ in state_names(kind, layers, bidir)}
    assert set(m.params) == set(params) | set(starts)
    x, y, L = rng.normal(size=(T, B, I)), rng.normal(size=(T, B, H * D)), np.array([T, 2, 4])
    t_starts = {k: torch.tensor(v, requires_grad=True) for k, v in starts.items()}
    which = {w: torch.stack([t_starts[n[:-5] + "0"] for n, _, ww in state_names(kind, layers, bidir) if ww == w])
             for w in ("h", "c") if w == "h" or kind == "LSTM"}  # fmt: skip
    state = {w: v[:, None, :].expand(layers * D, B, H) for w, v in which.items()}
    state = (state["h"], state["c"]) if kind == "LSTM" else state["h"]
    out_p, _ = mod(pack_padded_sequence(torch.tensor(x), torch.tensor(L), enforce_sorted=False), state)
    out, _ = pad_packed_sequence(out_p, total_length=T)
    mask = torch.tensor(np.arange(T)[:, None] < L[None, :], dtype=torch.float64)
    loss_t = ((((out - torch.tensor(y)) ** 2).mean(-1) * mask).sum(0)).mean()
    loss_t.backward()
    loss, grads = m.loss_and_grads({**params, **starts}, {"x": x}, {"y": y}, lengths={"x": L})
    assert abs(loss - loss_t.item()) < 1e-12 * abs(loss)
    for name, t in t_starts.items():
        assert grads[name].shape == (H,)
        assert rel(grads[name], t.grad.numpy()) < 1e-10, name
    for tname, t in mod.named_parameters():
        base, _, rest = tname.rpartition("_l")
        k, d = int(rest.split("_")[0]), 1 if rest.endswith("_reverse") else 0
        assert rel(grads[f"{prefix(layers, bidir, k, d)}.{base}"], t.grad.numpy()) < 1e-10, tname
