"""Plan -> text: the derived backward equations in math-like form, loop by loop (`rnnc grad`);
and what each loop's step costs (`rnnc compile --explain`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .graph import Graph, is_seq, operands
from .lower import Emitter, Namer
from .ops import GLOBAL, OPS, slot_prec_of
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


# ----- costs: `rnnc compile --explain` -----

VIEW_OPS = ("slice", "identity")  # no work of their own: a view, or a name


@dataclass
class LoopCost:
    """One loop's work per step: GEMMs as (rows, K, N), pointwise ops and their elements,
    the kernels a step launches (CuPy target), the bytes a step keeps for the backward pass."""

    function: str
    direction: int
    domain: str
    gemms: list[tuple[int, int, int]]
    ops: int
    elements: int
    kernels: int | None
    kept: int

    @property
    def flops(self) -> int:
        return sum(2 * b * k * n for b, k, n in self.gemms) + self.elements


def loop_costs(plans: dict[str, Plan], B: int, itemsize: int, target: str = "numpy") -> list[LoopCost]:
    """Per function and loop, what one step computes and keeps, from the plan alone."""
    from .fuse import Kernel, loop_kernels

    out = []
    for fname, plan in plans.items():
        g = plan.graph
        fused = loop_kernels(plan, fname, str) if target == "cupy" else {}
        for i, step in enumerate(plan.steps):
            if not isinstance(step, Loop):
                continue
            gemms, ops, elements, kept = [], 0, 0, 0
            for n in step.nodes:
                d = g.nodes[n]
                width = math.prod(d["shape"] or (1,))
                if n in plan.stored and n not in plan.running and n not in plan.views:
                    kept += B * width * itemsize
                if d["op"] in VIEW_OPS or OPS[d["op"]].kind == "leaf":
                    continue
                w = next((u for u, _ in operands(g, n) if g.nodes[u]["level"] == GLOBAL
                          and len(g.nodes[u]["shape"]) == 2), None)  # fmt: skip
                if d["op"] in ("matmul", "matmul_t") and w is not None:
                    rows, cols = g.nodes[w]["shape"]
                    gemms.append((B, cols, rows) if d["op"] == "matmul" else (B, rows, cols))
                else:
                    ops += 1
                    elements += B * width
            kernels = sum(isinstance(x, Kernel) for x in fused.get(i, [])) if fused else None
            out.append(LoopCost(fname, step.direction, step.dom, gemms, ops, elements, kernels, kept))
    return out


def estimate_us(cost: LoopCost, dtype) -> float:
    """A step's time on this machine, from probes: each GEMM of its shape timed once, each
    pointwise op as a NumPy multiply of its size (their mean size)."""
    import numpy as np

    total = 0.0
    for b, k, n in cost.gemms:
        total += probe(("gemm", b, k, n), lambda b=b, k=k, n=n: (np.ones((b, k), dtype), np.ones((k, n), dtype)),
                       lambda a, w: a @ w)  # fmt: skip
    if cost.ops:
        size = max(1, cost.elements // cost.ops)
        total += cost.ops * probe(("mul", size), lambda: (np.ones(size, dtype), np.ones(size, dtype)),
                                  lambda a, c: a * c)  # fmt: skip
    return total


PROBES: dict[tuple, float] = {}


def probe(key: tuple, make, run) -> float:
    """Microseconds of run(*make()), the median of 7 after one warm-up; cached per key."""
    import time

    if key not in PROBES:
        args = make()
        run(*args)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            run(*args)
            times.append(time.perf_counter() - t0)
        PROBES[key] = 1e6 * sorted(times)[3]
    return PROBES[key]


def cost_report(costs: list[LoopCost], measured: dict[str, float], dtype, B: int, T: int,
                estimate: bool = True) -> str:  # fmt: skip
    """The --explain text: per function its loops' work a step, then the measured time."""
    lines = []
    for fname in dict.fromkeys(c.function for c in costs):
        lines.append(f"{fname} (B={B}, T={T}):")
        for c in (c for c in costs if c.function == fname):
            way = "forward" if c.direction > 0 else "backward"
            gemm = ", ".join(f"[{b}x{k}]·[{k}x{n}]" for b, k, n in c.gemms) or "none"
            parts = [f"GEMMs {gemm}", f"{c.ops} pointwise ops on {c.elements:,} elements",
                     f"{c.flops / 1e6:.2f} MFLOP"]  # fmt: skip
            if c.kernels is not None:
                parts.append(f"{c.kernels} fused kernel{'s' if c.kernels != 1 else ''}")
            if c.kept:
                parts.append(f"stores {c.kept:,} bytes (what later steps and functions read)")
            if estimate:
                parts.append(f"estimated {estimate_us(c, dtype):.0f} us (its GEMMs, each op a NumPy multiply)")
            lines.append(f"  loop {way} over {c.domain}, a step: " + "; ".join(parts))
        if fname in measured:
            lines.append(f"  measured: {measured[fname]:.0f} us a step (the whole function / T)")
    return "\n".join(lines)
