"""The PyTorch oracle's largest errors over all its cases (tests/test_torch_oracle.py asserts
bars of 1e-12 for outputs and 1e-10 for gradients; this prints what is actually reached).

    python bench/oracle_errors.py
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import test_torch_oracle as oracle
import torch
from helpers import rel
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnc.compiler import compile_spec


def errors(kind: str, layers: int, bidir: bool, lengths: bool) -> tuple[float, float]:
    mod = oracle.torch_module(kind, layers, bidir)
    m = compile_spec(oracle.spec(kind, layers, bidir))
    params = oracle.params_from(mod, layers, bidir)
    T, B, I, H, P = oracle.T, oracle.B, oracle.I, oracle.H, oracle.P
    rng = np.random.default_rng(1)
    D, width = 2 if bidir else 1, P if kind == "LSTM_PROJ" else H
    x, y = rng.normal(size=(T, B, I)), rng.normal(size=(T, B, width * D))
    h0 = rng.normal(size=(layers * D, B, width)) * 0.5
    c0 = rng.normal(size=(layers * D, B, H)) * 0.5
    L = np.array([T, 2, 4]) if lengths else np.full(B, T)
    xt = torch.tensor(x, requires_grad=True)
    h0t, c0t = torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True)
    state = (h0t, c0t) if kind.startswith("LSTM") else h0t
    out_p, _ = mod(pack_padded_sequence(xt, torch.tensor(L), enforce_sorted=False), state)
    out, _ = pad_packed_sequence(out_p, total_length=T)
    mask = torch.tensor(np.arange(T)[:, None] < L[None, :], dtype=torch.float64)
    ((((out - torch.tensor(y)) ** 2).mean(-1) * mask).sum(0)).mean().backward()
    inputs = {"x": x}
    for name, i, which in oracle.state_names(kind, layers, bidir):
        inputs[name] = (h0 if which == "h" else c0)[i]
    lens = {"x": L} if lengths else None
    _, grads = m.loss_and_grads(params, inputs, {"y": y}, lengths=lens, with_inputs=True)
    out_err = rel(m.forward(params, inputs, lengths=lens)["h"], out.detach().numpy())
    grad_err = rel(grads["x"], xt.grad.numpy())
    for tname, t in mod.named_parameters():
        base, _, rest = tname.rpartition("_l")
        k, d = int(rest.split("_")[0]), 1 if rest.endswith("_reverse") else 0
        grad_err = max(grad_err, rel(grads[f"{oracle.prefix(layers, bidir, k, d)}.{base}"],
                                     t.grad.numpy()))  # fmt: skip
    for name, i, which in oracle.state_names(kind, layers, bidir):
        grad_err = max(grad_err, rel(grads[name], (h0t if which == "h" else c0t).grad.numpy()[i]))
    return out_err, grad_err


if __name__ == "__main__":
    results = [errors(*case, lengths) for case in oracle.CASES for lengths in (False, True)]
    print(f"{len(results)} cases: largest output error {max(r[0] for r in results):.2e}, "
          f"largest gradient error {max(r[1] for r in results):.2e} (norm-wise, float64)")
