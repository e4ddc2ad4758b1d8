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
    "sum_s": "Σ_s {0}", "softmax_s": "softmax_s({0})", "bcast_s": "{0} (each s)", "unevery": "{0}",
}  # fmt: skip
# the precedence of each template's result (9: an atom, as in ops.py); an infix op's operands
# need what the op registry's `slots` say, a Σ form's operand must be an atom, a call's anything
RESULT = {"outer": 3, "reduce_to": 3, "sum_f": 3, "edge_sum": 3, "ce_logits_d": 1, "sum_s": 3}
INFIX = {"add", "sub", "mul", "div", "neg", "matmul", "matmul_t", "sum"}
ATOM_OPERANDS = {"outer", "reduce_to", "sum_f", "slice", "slice_rows", "edge_sum", "loss_spread", "sum_s", "bcast_s"}


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
    the kernels a step launches (CuPy and native targets), the bytes a step keeps for the backward pass."""

    function: str
    direction: int
    domain: str
    gemms: list[tuple[int, int, int]]
    ops: int
    elements: int
    kernels: int | None
    kept: int
    attending: str | None = None  # the sequence whose every step s the step reads (attention)
    per_s: int = 0  # of the ops, those on a value per step s ([S, B, ...] at once, no loop over s)
    hoisted: tuple[str, ...] = ()  # the loop-invariant work over every step s, done before it

    @property
    def flops(self) -> int:
        return sum(2 * b * k * n for b, k, n in self.gemms) + self.elements


def loop_costs(plans: dict[str, Plan], B: int, itemsize: int, target: str = "numpy",
               steps: int = 1) -> list[LoopCost]:  # fmt: skip
    """Per function and loop, what one step computes and keeps, from the plan alone (a value
    per step s of another sequence, attention's, counts `steps` rows of B)."""
    from .fuse import Kernel, loop_kernels

    out = []
    for fname, plan in plans.items():
        g = plan.graph
        fused = loop_kernels(plan, fname, str) if target in ("cupy", "native") else {}
        for i, step in enumerate(plan.steps):
            if not isinstance(step, Loop):
                continue
            gemms, ops, elements, kept, per_s, attending = [], 0, 0, 0, 0, None
            for n in step.nodes:
                d = g.nodes[n]
                rows = B * (steps if d["pair"] else 1)
                width = math.prod(d["shape"] or (1,))
                if n in plan.stored and n not in plan.running and n not in plan.views:
                    kept += rows * width * itemsize
                if d["op"] in VIEW_OPS or OPS[d["op"]].kind == "leaf":
                    continue
                w = next((u for u, _ in operands(g, n) if g.nodes[u]["level"] == GLOBAL
                          and len(g.nodes[u]["shape"]) == 2), None)  # fmt: skip
                if d["op"] in ("matmul", "matmul_t") and w is not None:
                    r, c = g.nodes[w]["shape"]
                    gemms.append((rows, c, r) if d["op"] == "matmul" else (rows, r, c))
                else:
                    ops += 1
                    elements += rows * width
                pair = d["pair"] or next((g.nodes[u]["pair"] for u, _ in operands(g, n) if g.nodes[u]["pair"]), None)
                if pair:
                    per_s += 1
                    attending = pair
            kernels = sum(isinstance(x, Kernel) for x in fused.get(i, [])) if fused else None
            hoisted = tuple(hoisted_work(plan, step, B, steps)) if attending else ()
            out.append(LoopCost(fname, step.direction, step.dom, gemms, ops, elements, kernels, kept,
                                attending, per_s, hoisted))  # fmt: skip
    return out


def hoisted_work(plan: Plan, loop: Loop, B: int, steps: int):
    """The GEMMs over every step s that a loop reads, computed once before it (not per step)."""
    g = plan.graph
    em = Emitter(plan, Namer(g), {})
    inside = set(loop.nodes)
    for s in plan.steps[: plan.steps.index(loop)]:
        if not isinstance(s, Once):
            continue
        d = g.nodes[s.node]
        if d["op"] != "matmul" or not d["pair"] or is_seq(d["level"]):
            continue
        if not any(v in inside for v in g.successors(s.node)):
            continue
        w = operands(g, s.node)[0][0]
        r, c = g.nodes[w]["shape"]
        yield f"{em.name(s.node)} = {math_of(em, s.node, None)}: one GEMM [{steps * B}x{c}]·[{c}x{r}]"


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
            for h in c.hoisted:
                lines.append(f"  once, before the loop over {c.domain}: {h} over every step s of {c.attending}")
            lines.append(f"  loop {way} over {c.domain}, a step: " + "; ".join(parts))
            if c.attending:
                lines.append(f"    {c.per_s} of its ops read every step s of {c.attending} at once "
                             f"([S={T}, B] rows, batched; no loop over s)")
        if fname in measured:
            lines.append(f"  measured: {measured[fname]:.0f} us a step (the whole function / T)")
    return "\n".join(lines)
