"""Shared test helpers: small dims, random data, the reference values from the interpreter."""

from __future__ import annotations

import numpy as np

from rnnc.compiler import compile_spec
from rnnc.grad import grad
from rnnc.interpret import interpret, outputs
from rnnc.unroll import unroll

# dims small enough that central differences over whole tensors stay quick
SMALL = {"V": 5, "H": 4, "K": 3, "F": 4, "S": 4, "A": 3}


def small_dims(path: str) -> dict[str, int]:
    from rnnc.compiler import front, read_spec

    text, file = read_spec(path)
    _, g = front(text, file)
    return {k: v for k, v in SMALL.items() if k in g.graph["dims"]}


def random_data(g, T: int, B: int, seed: int = 0, lengths: bool = False):
    rng = np.random.default_rng(seed)
    domains = g.graph["domains"]

    def steps(dom):
        base = domains[dom]["halves"]
        return steps(base) // 2 if base else T

    Ts = {d: steps(d) for d in domains}
    params = {
        name: rng.normal(size=g.nodes[n]["shape"]) * 0.5 for name, n in g.graph["params"].items()
    }
    inputs, targets = {}, {}
    for kind, dst in (("inputs", inputs), ("targets", targets)):
        for name, n in g.graph[kind].items():
            d = g.nodes[n]
            lead = (Ts[d["level"]], B) if d["level"] in Ts else (B,)
            dst[name] = (rng.integers(0, d["shape"][0], size=lead) if d["classes"]
                         else rng.normal(size=lead + tuple(d["shape"])))  # fmt: skip
    for name, n in g.graph.get("masks", {}).items():  # training's masks, drawn here by hand
        if n not in g:
            continue
        d, a = g.nodes[n], g.nodes[n]["attrs"]
        u = rng.random(((Ts[d["level"]], B) if d["level"] in Ts else (B,)) + tuple(d["shape"]))
        inputs[name] = (u >= a["p"]) / (1 - a["p"]) if a["kind"] == "dropout" else (u < a["p"]) * 1.0
    L = None
    if lengths:
        L = {
            d: rng.integers(1, Ts[d] + 1, size=B)
            for d, info in domains.items()
            if not info["halves"]
        }
    return Ts, params, inputs, targets, L


def reference(g, Ts, params, inputs, targets, L=None):
    """Loss, gradients and outputs by reverse mode over the unrolled DAG, in float64."""
    dag = unroll(g, Ts, masked=L is not None)
    gd = grad(dag)
    vals = interpret(gd, params, inputs, targets, lengths=L)
    grads = {}
    for name, dn in gd.graph["grads"].items():
        grads[name] = np.stack([vals[x] for x in dn]) if isinstance(dn, list) else vals[dn]
    return (
        float(vals[gd.graph["loss"]]),
        grads,
        outputs(dag, interpret(dag, params, inputs, targets, lengths=L)),
    )


def rel(a, b, floor: float = 1e-30) -> float:
    """Norm-wise relative error; `floor` keeps a gradient that cancels to ~0 from dividing by 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))


def grad_scale(grads: dict) -> float:
    """The largest gradient norm: the scale below which a difference is round-off."""
    return max((float(np.linalg.norm(g)) for g in grads.values()), default=1.0)


def finite_diff(m, params, inputs, targets, name, L=None, eps=1e-6, entries=None):
    """Central differences of the compiled loss along chosen entries of one tensor."""
    tensors = params if name in params else inputs
    flat = tensors[name].reshape(-1)
    idx = range(flat.size) if entries is None else entries
    out = []
    for i in idx:
        old = flat[i]
        flat[i] = old + eps
        lp = m.loss(params, inputs, targets, lengths=L)["loss"]
        flat[i] = old - eps
        lm = m.loss(params, inputs, targets, lengths=L)["loss"]
        flat[i] = old
        out.append((lp - lm) / (2 * eps))
    return np.array(out), list(idx)


def compiled(path_or_text: str, dims=None):
    return compile_spec(path_or_text, dims=dims)


# PyTorch's parameter names with the gates in another order (i, f, o, g): a cell that looks like
# the library's LSTM and computes something else
PERMUTED_LSTM = """cell LSTM(x[I]) -> h[H] {
  param weight_ih[4*H, I], weight_hh[4*H, H], bias_ih[4*H], bias_hh[4*H]
  z = weight_ih @ x + bias_ih + weight_hh @ h[t-1] + bias_hh
  i = sigmoid(z[0:H])
  f = sigmoid(z[H:2*H])
  o = sigmoid(z[2*H:3*H])
  g = tanh(z[3*H:4*H])
  c = f * c[t-1] + i * g
  h = o * tanh(c)
}
"""
