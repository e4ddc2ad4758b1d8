"""One parametrized test over the op registry: every op has a shape rule and a NumPy
lowering; every differentiable op's VJP equals central differences in float64 on its domain."""

from __future__ import annotations

import numpy as np
import pytest

from rnnc import kernels
from rnnc.graph import Sym, add_op, new_graph
from rnnc.ops import GLOBAL, OPS, STATIC, operand_text, render

# ops that need more than vectors of one size to test, with the operand shapes they take
SHAPES = {
    "matmul": [(3, 4), (4,)], "matmul_t": [(3, 4), (3,)], "outer": [(3,), (4,)],
    "concat": [(3,), (2,)], "slice": [(5,)], "slice_rows": [(5, 2)], "pad": [(2,)],
    "ce_logits": [(4,), (4,)], "ce_probs": [(4,), (4,)], "ce_sigmoid": [(4,), (4,)], "sqerr": [(3,), (3,)],
    "sum_f": [(3,)], "reduce_to": [(3,)], "loss_reduce": [()], "pairs": [(3,)], "first": [(3,)],
    "last": [(3,)], "impulse": [(3,)], "select_valid": [(3,), (3,)],
    "loss_step": [()], "on_first": [(3,), (3,)], "on_last": [(3,), (3,)],
    "pick_last": [(3,)] * 4, "loss_spread": [(), ()], "unpairs": [(6,), (3,)],
    "stack": [(3,)] * 4,
}  # fmt: skip
# attention: operands holding every step s of sequence x ([S, B, ...] with S = T)
PAIRS = {"sum_s": ["x"], "softmax_s": ["x"], "unstack": ["x"], "unevery": ["x"]}
ATTRS = {
    "slice": {"start": 1, "stop": 4, "axis": -1}, "slice_rows": {"start": 1, "stop": 3},
    "pad": {"start": 1, "n": 5, "axis": -1}, "concat": {"axis": -1}, "loss_reduce": {"mode": "sum", "dom": "x"},
    "last": {"dom": "x"}, "first": {"dom": "x"}, "impulse": {"dom": "x"}, "pairs": {"dom": "x/2"},
    "select_valid": {"t": 2, "s": 1, "dom": "x"}, "pick_last": {"dom": "x"},
    "loss_step": {"t": 1, "mode": "mean", "dom": "x"}, "reduce_to": {"keep": 1, "level": GLOBAL},
    "elu": {"alpha": 1.0}, "leaky_relu": {"alpha": 0.01}, "on_first": {"dom": "x"},
    "on_last": {"dom": "x"}, "every": {"over": "x"}, "stack": {"over": "x"}, "unevery": {"over": "x"},
    "sum_s": {"over": "x"}, "bcast_s": {"over": "x"}, "softmax_s": {"over": "x", "causal": True, "t": 2},
}  # fmt: skip
# a mask with one short sequence, so masked ops are tested where it matters
MASK = np.array([[True, True, True], [True, True, True], [True, False, True], [True, False, True]])
LEVELS = {  # operand levels, where not one step of a sequence (STATIC)
    "matmul": [GLOBAL, STATIC], "matmul_t": [GLOBAL, STATIC], "last": ["x"], "first": ["x"],
    "pairs": ["x"], "loss_reduce": ["x"], "on_first": [STATIC, "x"], "on_last": [STATIC, "x"],
    "batch": [GLOBAL], "every": ["x"],
}  # fmt: skip
DIFFERENTIABLE = sorted(n for n, op in OPS.items() if op.vjp is not None and op.kind != "leaf")
T, B = 4, 3


def sample(rng, shape, level, domain, classes=False, pair=None):
    lead = (T, B) if level not in (GLOBAL, STATIC) else (B,) if level == STATIC else ()
    lead = (T, *lead) if pair else lead
    if classes:
        return rng.integers(0, shape[0], size=lead)
    x = rng.normal(size=lead + tuple(shape))
    if domain == "positive":
        x = np.abs(x) + 0.5
    elif domain == "away0":
        x = np.sign(x) * (np.abs(x) + 0.5)
    elif domain == "unit":
        x = kernels.softmax(x)
    return x


def build(name):
    """A graph holding op `name` applied to leaf inputs."""
    op = OPS[name]
    shapes = SHAPES.get(name, [(3,)] * (op.arity or 2))
    levels = LEVELS.get(name, [STATIC] * len(shapes))
    g = new_graph(model="t", file="<t>", params={}, inputs={}, targets={}, outputs={})
    leaves = []
    for i, (shape, lv) in enumerate(zip(shapes, levels, strict=True)):
        n = add_op(g, "input", (), f"a{i}", dom=lv)
        g.nodes[n]["shape"], g.nodes[n]["level"] = shape, lv
        g.nodes[n]["classes"] = op.labels and i == 1
        g.nodes[n]["pair"] = PAIRS.get(name, [None] * len(shapes))[i]
        leaves.append(n)
    out = add_op(g, name, [(n, 0) for n in leaves], **{**op.attrs, **ATTRS.get(name, {})})
    return g, leaves, out


def evaluate(g, n, values):
    """Evaluate node n from leaf values with the op's own template (the interpreter's way)."""
    from rnnc.graph import operands

    d = g.nodes[n]
    if n in values:
        return values[n]
    ins = operands(g, n)
    args = [operand_text(f"a{i}", g.nodes[u]["shape"], g.nodes[u]["level"], d["shape"])
            for i, (u, _) in enumerate(ins)]  # fmt: skip
    dom = d["attrs"].get("dom") or "x"
    ctx = {"M": "M", "T": str(T), "t": d["attrs"].get("t", 0), "B": str(B), "dt": "np.float64",
           "rng": "rng", "n": d["shape"][-1] if d["shape"] else 1, "carried": "False",
           "Mo": "M", "To": str(T), "r": len(d["shape"]), "window": "None"}  # fmt: skip
    del dom
    text = render(OPS[d["op"]], args, d["attrs"], ctx)
    ns = {k: getattr(kernels, k) for k in dir(kernels) if not k.startswith("_")}
    ns.update(np=np, rng=np.random.default_rng(0), M=MASK)
    local = {f"a{i}": evaluate(g, u, values) for i, (u, _) in enumerate(ins)}
    return eval(text, ns, local)


@pytest.mark.parametrize("name", sorted(OPS), ids=sorted(OPS))
def test_op_has_shape_rule_and_lowering(name):
    op = OPS[name]
    assert callable(op.shape) and op.numpy
    if op.user and op.kind != "leaf" and name not in ("sample", "onehot"):
        assert op.vjp is not None, f"{name} is callable from specs but has no VJP"


@pytest.mark.parametrize("name", DIFFERENTIABLE, ids=DIFFERENTIABLE)
def test_vjp_matches_central_differences(name):
    rng = np.random.default_rng(0)
    g, leaves, out = build(name)
    op = OPS[name]
    values = {n: sample(rng, g.nodes[n]["shape"], g.nodes[n]["level"], op.domain, g.nodes[n]["classes"],
                        g.nodes[n]["pair"]) for n in leaves}  # fmt: skip
    y = evaluate(g, out, values)
    cot = rng.normal(size=np.shape(y))
    gnode = add_op(g, "input", (), "g", dom=g.nodes[out]["level"])
    g.nodes[gnode]["shape"], g.nodes[gnode]["level"] = g.nodes[out]["shape"], g.nodes[out]["level"]
    g.nodes[gnode]["pair"] = g.nodes[out]["pair"]
    values[gnode] = cot
    cts = op.vjp(Sym(g, gnode), Sym(g, out), *(Sym(g, n) for n in leaves), **g.nodes[out]["attrs"])
    values[out] = y
    for leaf, ct in zip(leaves, cts, strict=True):
        if ct is None:
            continue
        ana = np.broadcast_to(evaluate(g, ct.node, values), np.shape(values[leaf]))
        x = values[leaf]
        num = np.zeros(x.shape)
        eps = 1e-6
        for i in np.ndindex(x.shape):
            old = x[i]
            x[i] = old + eps
            up = np.sum(cot * evaluate(g, out, {k: values[k] for k in leaves}))
            x[i] = old - eps
            down = np.sum(cot * evaluate(g, out, {k: values[k] for k in leaves}))
            x[i] = old
            num[i] = (up - down) / (2 * eps)
        err = np.linalg.norm(ana - num) / max(np.linalg.norm(num), 1e-12)
        assert err < 1e-6, f"{name}: operand {leaves.index(leaf)} relative error {err:.2e}"


@pytest.mark.parametrize(
    "name", ["sigmoid", "softmax", "log_softmax", "ce_logits", "ce_sigmoid", "softplus", "tanh", "exp"]
)
def test_extreme_inputs_stay_finite(name):
    rng = np.random.default_rng(0)
    g, leaves, out = build(name)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        values = {}
        for n in leaves:
            v = sample(rng, g.nodes[n]["shape"], g.nodes[n]["level"], "real", g.nodes[n]["classes"])
            values[n] = (
                v
                if g.nodes[n]["classes"]
                else v * (1e4 if name in ("softmax", "log_softmax", "ce_logits", "ce_sigmoid") else 1e3)
            )
        if name == "exp":
            values = {n: np.clip(v, -700, 700) for n, v in values.items()}
        y = evaluate(g, out, values)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(n for n, op in OPS.items() if op.user and op.kind != "leaf"))
def test_every_op_a_spec_calls_lowers_to_onnx(name):
    # sample and onehot run only while generating, which the export does not cover
    assert OPS[name].onnx is not None or name in ("sample", "onehot")
