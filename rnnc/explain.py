"""Plan -> text: the derived backward equations in math-like form, loop by loop (`rnnc grad`)."""

from __future__ import annotations

from .graph import Graph, is_seq, operands
from .lower import Emitter, Namer
from .schedule import Loop, Once, Plan

MATH = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} ⊙ {1}", "div": "{0} / {1}", "neg": "-{0}",
    "matmul": "{0} · {1}", "matmul_t": "{0}ᵀ · {1}", "outer": "Σ_t,b {0} {1}ᵀ",
    "reduce_to": "Σ {0}", "sum_f": "Σ_i {0}", "tanh": "tanh({0})", "sigmoid": "σ({0})",
    "slice": "{0}[{start}:{stop}]", "slice_rows": "{0}[{start}:{stop}, :]",
    "edge_sum": "Σ(steps before the start) {0}", "identity": "{0}",
    "ce_logits_d": "softmax({0}) - onehot({1})", "loss_spread": "∂loss/∂{1}",
}  # fmt: skip
ATOMIC = {"tanh", "sigmoid", "slice", "slice_rows", "identity", "matmul", "matmul_t"}


def math_of(em: Emitter, n: int, loop: Loop | None) -> str:
    g = em.g
    d = g.nodes[n]
    args = []
    for u, k in operands(g, n):
        du = g.nodes[u]
        if du["op"] == "const":
            text = f"{du['attrs']['value']:g}"
        elif u in em.inline:
            text = math_of(em, u, loop)
            if du["op"] not in ATOMIC and "(" not in text[:1]:
                text = f"({text})"
        else:
            text = em.name(u)
            if is_seq(du["level"]):
                text += "[t]" if k == 0 else f"[t-{k}]" if k > 0 else f"[t+{-k}]"
        args.append(text)
    if d["op"] == "sum":
        return " + ".join(args)
    if d["op"] == "concat":
        return "[" + "; ".join(args) + "]"
    template = MATH.get(d["op"])
    if template is None:
        return f"{d['op']}({', '.join(args)})"
    return template.format(*args, **d["attrs"])


def explain(plan: Plan) -> str:
    """One line per adjoint equation; loops headed by their direction."""
    g: Graph = plan.graph
    em = Emitter(plan, Namer(g), {})
    out: list[str] = []
    for step in plan.steps:
        nodes = [step.node] if isinstance(step, Once) else step.nodes
        lines = []
        for n in nodes:
            d = g.nodes[n]
            if "adjoint_of" not in d or n in em.inline:
                continue
            lhs = em.name(n) + ("[t]" if is_seq(d["level"]) else "")
            lines.append(f"{lhs} = {math_of(em, n, step if isinstance(step, Loop) else None)}")
        if not lines:
            continue
        if isinstance(step, Loop):
            way = "t = 0 up to T-1" if step.direction > 0 else "t = T-1 down to 0"
            out.append(f"for {way} over {step.dom}:")
            out.extend("    " + line for line in lines)
        else:
            out.extend(lines)
    return "\n".join(out)
