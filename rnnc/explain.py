"""Plan -> text: the derived backward equations in math-like form, loop by loop (`rnnc grad`)."""

from __future__ import annotations

from .graph import Graph, is_seq, operands
from .lower import Emitter, Namer
from .ops import OPS, slot_prec_of
from .schedule import Loop, Once, Plan

MATH = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} ⊙ {1}", "div": "{0} / {1}", "neg": "-{0}",
    "matmul": "{0} · {1}", "matmul_t": "{0}ᵀ · {1}", "outer": "Σ_t,b {0} {1}ᵀ",
    "reduce_to": "Σ {0}", "sum_f": "Σ_i {0}", "tanh": "tanh({0})", "sigmoid": "σ({0})",
    "slice": "{0}[{start}:{stop}]", "slice_rows": "{0}[{start}:{stop}, :]",
    "edge_sum": "Σ(steps before the start) {0}", "identity": "{0}",
    "ce_logits_d": "softmax({0}) - onehot({1})", "loss_spread": "∂loss/∂{1}",
}  # fmt: skip
# the precedence of each template's result (9: an atom, as in ops.py); an infix op's operands
# need what the op registry's `slots` say, a Σ form's operand must be an atom, a call's anything
RESULT = {"outer": 3, "reduce_to": 3, "sum_f": 3, "edge_sum": 3, "ce_logits_d": 1}
INFIX = {"add", "sub", "mul", "div", "neg", "matmul", "matmul_t", "sum"}
ATOM_OPERANDS = {"outer", "reduce_to", "sum_f", "slice", "slice_rows", "edge_sum", "loss_spread"}


def needs(op: str, i: int) -> int:
    """The precedence operand i's text must have inside op's math form."""
    if op in INFIX:
        return slot_prec_of(op, i)
    return 9 if op in ATOM_OPERANDS else 0


def math_of(em: Emitter, n: int, loop: Loop | None) -> str:
    return math_prec(em, n, loop)[0]


def math_prec(em: Emitter, n: int, loop: Loop | None) -> tuple[str, int]:
    """n's equation in math form, and its precedence: operands are parenthesized by
    precedence, never by how their text happens to begin."""
    g = em.g
    d = g.nodes[n]
    op = d["op"]
    args = []
    for i, (u, k) in enumerate(operands(g, n)):
        du = g.nodes[u]
        if du["op"] == "const":
            v = du["attrs"]["value"]
            text, prec = f"{v:g}", 9 if v >= 0 else 4
        elif u in em.inline:
            text, prec = math_prec(em, u, loop)
        else:
            text, prec = em.name(u), 9
            if is_seq(du["level"]):
                text += "[t]" if k == 0 else f"[t-{k}]" if k > 0 else f"[t+{-k}]"
        if prec < needs(op, i):
            text = f"({text})"
        args.append(text)
    if op == "identity":
        return args[0], 9
    if op == "sum":
        return " + ".join(args), OPS["sum"].prec
    if op == "concat":
        return "[" + "; ".join(args) + "]", 9
    template = MATH.get(op)
    if template is None:
        return f"{op}({', '.join(args)})", 9
    prec = OPS[op].prec if op in INFIX else RESULT.get(op, 9)
    return template.format(*args, **d["attrs"]), prec


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
