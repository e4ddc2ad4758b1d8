"""How exact are the attention specs' gradients? Per spec, in float64, with source and target
of different lengths and random lengths per sequence: the compiled loss and gradients against
reverse mode over the unrolled DAG (rnnc's reference semantics, no scheduling), against central
differences, and step-by-step decoding against the full forward pass on the decoded prefix.

    python bench/attention_errors.py
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from rnnc.compiler import compile_spec  # noqa: E402
from rnnc.decode import decode  # noqa: E402
from rnnc.grad import grad  # noqa: E402
from rnnc.gradcheck import random_batch, random_lengths  # noqa: E402
from rnnc.interpret import interpret  # noqa: E402
from rnnc.unroll import unroll  # noqa: E402

SPECS = {"attention_additive": {"S": 5, "V": 6, "H": 4, "A": 3}, "attention_dot": {"S": 5, "V": 6, "H": 4},
         "self_attention": {"V": 6, "H": 4}}  # fmt: skip


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-300))


def batch(m, Ts, B, rng):
    params = {k: rng.normal(size=v.shape) * 0.5 for k, v in m.init_params(0, np.float64).items()}
    inputs, targets, _ = random_batch(m, Ts, B, int(rng.integers(2**31)))
    L = random_lengths(m, Ts, B, rng, shortest=1)
    for v in L.values():
        v[-1] = 1  # and one sequence of a single step
    return params, inputs, targets, L


def main() -> int:
    rng = np.random.default_rng(0)
    print("| spec | loss vs unrolled | gradients vs unrolled (largest) | vs central differences (largest) | decode vs full pass |")
    print("|---|---|---|---|---|")
    for name, dims in SPECS.items():
        m = compile_spec(os.path.join(HERE, "..", "specs", name + ".rnn"), dims=dims)
        doms = list(m.graph.graph["domains"])
        Ts = {d: T for d, T in zip(doms, (7, 4), strict=False)}
        params, inputs, targets, L = batch(m, Ts, 4, rng)
        gd = grad(unroll(m.graph, Ts, masked=True))
        vals = interpret(gd, params, inputs, targets, lengths=L)
        ref = {k: np.stack([vals[x] for x in v]) if isinstance(v, list) else vals[v] for k, v in gd.graph["grads"].items()}
        loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
        e_loss = abs(loss - vals[gd.graph["loss"]]) / abs(loss)
        e_grad = max(rel(grads[k], v) for k, v in ref.items())
        e_fd = 0.0  # norm-wise per tensor, over 8 random entries of each
        for k in params:
            flat, num, ana = params[k].reshape(-1), [], []
            for i in rng.choice(flat.size, min(flat.size, 8), replace=False):
                old = flat[i]
                flat[i] = old + 1e-5
                up = m.loss(params, inputs, targets, lengths=L)["loss"]
                flat[i] = old - 1e-5
                down = m.loss(params, inputs, targets, lengths=L)["loss"]
                flat[i] = old
                num.append((up - down) / 2e-5)
                ana.append(grads[k].reshape(-1)[i])
            e_fd = max(e_fd, rel(ana, num))
        e_dec = "-"
        if m.graph.graph["generate"]:
            src, Ls = inputs["src"], L["src"]
            out = decode(m, params, 5, np.ones((4, 1), int), static={"src": src}, lengths={"src": Ls})
            tokens = np.concatenate([np.ones((4, 1), int), np.array(out.tokens)], axis=1)[:, :-1].T
            V = m.inputs["tgt_in"][0][0]
            full = m.forward(params, {"tgt_in": np.eye(V)[tokens], "src": src},
                             lengths={"src": Ls, "tgt_in": np.full(4, tokens.shape[0])})["p"]  # fmt: skip
            e_dec = f"{rel(np.array(out.probs), full):.2e}"
        print(f"| {name} | {e_loss:.2e} | {e_grad:.2e} | {e_fd:.2e} | {e_dec} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
