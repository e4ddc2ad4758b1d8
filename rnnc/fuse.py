"""Loop -> kernels: the pointwise part of each time step as one generated CUDA kernel, so that
on the GPU a step costs its matrix products and one launch, not one launch per operation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from math import gcd

from .graph import Graph, init_of, operands, source_line
from .ops import GLOBAL, OPS
from .schedule import Loop, Plan

MAX_UNROLL = 8  # a thread computes at most this many columns of one output
MAX_BLOCK = 1024  # CUDA's most threads in a block: a row's threads, where a kernel reduces rows


class NotFusable(Exception):
    """A node the kernel cannot compute (a concat whose parts split a thread's columns)."""

    def __init__(self, node: int):
        self.node = node


@dataclass
class Arg:
    """One kernel parameter: an input read at `delay`, or an output (written this step)."""

    node: int
    delay: int
    kind: str  # "row": [B, V] | "vector": [V] (no batch) | "per_b": [B] | "value": one number
    width: int  # V: elements per batch row
    out: bool = False
    mask: bool = False  # a [B] bool: the read at `delay` falls inside the sequence
    name: str = ""  # the parameter's name in the kernel
    ahead: bool = False  # read or written for the loop's next step (see `rotated`)


@dataclass
class Kernel:
    """The pointwise nodes of one phase of a loop body, computed by B * width threads."""

    name: str
    nodes: list[int]
    width: int
    args: list[Arg] = field(default_factory=list)
    source: str = ""  # CUDA C; `real` is a typedef the caller puts in front
    # it reduces over rows (a sum, a mean, a layernorm): one block of `width` threads a sequence
    rows: bool = False
    # the first kernel of the step, computed here for the next step (see `rotated`); it is
    # launched on its own once, before the loop, for the first step
    ahead: Kernel | None = None


@dataclass
class Accumulate:
    """`into = partial + gemm` without a kernel of its own: the kernel that makes the partial
    sum writes it into `into`'s row, then the GEMM adds its product there (cuBLAS, beta = 1)."""

    gemm: int
    into: int


def fusable(g: Graph, n: int) -> bool:
    d = g.nodes[n]
    op = OPS[d["op"]]
    if len(d["shape"]) > 1 or d["pair"] or any(g.nodes[u]["pair"] for u in g.pred[n]):
        return False  # a value per step s (attention): CuPy's array ops over [S, B, ...]
    if d["op"] == "slice":
        return True
    if d["op"] == "concat":
        return d["attrs"].get("axis", -1) == -1
    return op.cuda is not None or op.cuda_row is not None


def needs_mask(g: Graph, u: int, k: int) -> bool:
    """A read at t-k must check that t-k lies inside the sequence: reads from the future, and
    reads of adjoints (which are 0 past the end). A forward read from the past needs none:
    what a step past the end reads never reaches a step inside."""
    return k != 0 and not (k > 0 and "adjoint_of" not in g.nodes[u])


def phases(g: Graph, loop: Loop, bad: set[int]) -> list[list[int]]:
    """The loop body in phases: phase 2i holds pointwise nodes (one kernel), 2i+1 the other
    nodes (GEMMs) that need them; each node as early as its same-step operands allow."""
    inside = set(loop.nodes)
    level: dict[int, int] = {}
    for n in loop.nodes:  # a same-step dependency order
        fused = fusable(g, n) and n not in bad
        p = 0
        for u, k in operands(g, n):
            if u in inside and k == 0:
                q = level[u]
                # a GEMM reads kernel i's results in phase 2i+1; a kernel reads a GEMM's in 2i+2
                p = max(p, q + 1 if (q % 2 == 0) != fused else q)
        if not fused and p % 2 == 0:
            p += 1
        level[n] = p
    out = [[] for _ in range(max(level.values(), default=0) + 1)]
    for n in loop.nodes:
        out[level[n]].append(n)
    return out


def kernels_for(
    g: Graph, plan: Plan, loop: Loop, prefix: str, label: Callable[[int], str]
) -> list[list[int] | Kernel]:
    """The loop body as a sequence of plain node lists (emitted as array code) and kernels;
    `label` names a node's value in the CUDA source (the NumPy code's names)."""
    bad: set[int] = set()
    while True:
        try:
            return build(g, plan, loop, prefix, bad, label)
        except NotFusable as e:
            bad.add(e.node)


def build(
    g: Graph, plan: Plan, loop: Loop, prefix: str, bad: set[int], label: Callable[[int], str]
) -> list[list[int] | Kernel]:
    items: list[list[int] | Kernel] = []
    for i, nodes in enumerate(phases(g, loop, bad)):
        if not nodes:
            continue
        if i % 2:
            items.append(nodes)
            continue
        k = Kernel(f"{prefix}_{len(items)}", nodes, 1)
        make(g, plan, loop, k, label)
        if k.source:
            items.append(k)
        else:
            items.append(nodes)
    return rotated(g, plan, loop, accumulated(g, plan, loop, items), label)


def rotated(
    g: Graph, plan: Plan, loop: Loop, items: list, label: Callable[[int], str]
) -> list[list[int] | Kernel | Accumulate]:
    """A step that starts with a kernel reading only the previous step's values (and values
    made outside the loop): that kernel's work for step t+1 is done at the end of step t, by
    the step's last kernel, so each step launches one kernel fewer. A variationally dropped
    LSTM is the case: `dropout(h[t-1])` forward, the gates' adjoints from `dh[t+1]` backward.
    The first kernel still runs once, before the loop, for the first step."""
    kernels = [i for i, x in enumerate(items) if isinstance(x, Kernel)]
    if len(kernels) < 2 or kernels[0] != 0:
        return items
    first, last = items[0], items[kernels[-1]]
    before = {n for x in items[: kernels[-1] + 1] for n in (x.nodes if isinstance(x, Kernel) else
              [x.into] if isinstance(x, Accumulate) else x)}  # fmt: skip
    body, mine = set(loop.nodes), set(first.nodes)
    for n in first.nodes:
        for u, k in operands(g, n):
            if u not in body:
                continue  # made outside the loop: read at the next step's row
            if (k == 0 and u not in mine) or k * loop.direction < 0:
                return items
            if k == loop.direction and u not in before:
                return items  # made after the last kernel: not ready when it runs
    host = Kernel(last.name, last.nodes, 1)
    try:
        make(g, plan, loop, host, label, ahead=first)
    except NotFusable:
        return items  # the two kernels' columns do not line up
    if not host.source:
        return items
    host.ahead = first
    return [host if x is last else x for x in items[1:]]


def only_use(g: Graph, plan: Plan, u: int, v: int) -> bool:
    """u is read by v alone, this step, and kept nowhere."""
    edges = list(g.out_edges(u, data=True))
    return (
        len(edges) == 1
        and edges[0][1] == v
        and edges[0][2]["delay"] == 0
        and u not in plan.stored
        and u not in plan.wanted.values()
        and plan.pads.get(u, (0, 0)) == (0, 0)
    )


def accumulated(
    g: Graph, plan: Plan, loop: Loop, items: list[list[int] | Kernel]
) -> list[list[int] | Kernel | Accumulate]:
    """A step that ends in a kernel computing only `n = a + W·x`, with `a` from an earlier
    kernel: that kernel writes a into n's row and the GEMM accumulates into it (GRU's
    backward step: dh[t-1] = dh·z + Uᵀ·dgates), so the step has one launch fewer."""
    out: list = list(items)
    last = out[-1] if out else None
    if not (isinstance(last, Kernel) and len(last.nodes) == 1 and len(out) >= 3):
        return out
    (n,) = last.nodes
    d = g.nodes[n]
    ins = operands(g, n)
    if (
        d["op"] not in ("add", "sum")
        or len(ins) != 2
        or any(k for _, k in ins)
        or len(d["shape"]) != 1
    ):
        return out
    gemms = out[-2]
    for (m, _), (a, _) in (ins, ins[::-1]):
        op = OPS[g.nodes[m]["op"]]
        if op.accumulate is None or not isinstance(gemms, list) or m not in gemms:
            continue
        (w, kw), (_, kx) = operands(g, m)
        if g.nodes[w]["level"] != GLOBAL or len(g.nodes[w]["shape"]) != 2 or kw or kx:
            continue  # cuBLAS needs a fixed matrix and this step's [B, K] rows
        maker = next((k for k in out[:-2] if isinstance(k, Kernel) and a in k.nodes), None)
        if maker is None or not only_use(g, plan, m, n) or not only_use(g, plan, a, n):
            continue
        if tuple(g.nodes[a]["shape"]) != tuple(d["shape"]):
            continue
        for arg in maker.args:
            if arg.out and arg.node == a:
                arg.node = n  # the kernel's result goes straight into n's row
        gemms.remove(m)
        return [*out[:-2], *([gemms] if gemms else []), Accumulate(m, n)]
    return out


def outputs(g: Graph, plan: Plan, loop: Loop, nodes: list[int]) -> list[int]:
    """The kernel's values needed beyond it: stored, or read this step by another part of
    the loop body (a GEMM, or a later kernel)."""
    mine, body = set(nodes), set(loop.nodes)
    out = []
    for n in nodes:
        later = any(v in body and v not in mine and e["delay"] == 0
                    for _, v, e in g.out_edges(n, data=True))  # fmt: skip
        if n in plan.stored or n in plan.wanted.values() or later:
            out.append(n)
    return out


def make(
    g: Graph,
    plan: Plan,
    loop: Loop,
    k: Kernel,
    label: Callable[[int], str],
    ahead: Kernel | None = None,
) -> None:
    """Fill k's args and CUDA source; leave source empty when a kernel would not pay. With
    `ahead`, k also computes that kernel's nodes for the loop's next step (`rotated`)."""
    mine = set(k.nodes)
    outs = outputs(g, plan, loop, k.nodes)
    next_nodes = set(ahead.nodes) if ahead else set()
    next_outs = [a.node for a in ahead.args if a.out] if ahead else []
    if not outs:
        return
    widths = [g.nodes[o]["shape"][0] for o in outs + next_outs if g.nodes[o]["shape"]]
    # a row reduction: each thread holds the same columns of every vector it reduces
    reduced = [n for n in [*k.nodes, *next_nodes] if OPS[g.nodes[n]["op"]].cuda_row]
    widths += [g.nodes[u]["shape"][0] for n in reduced for u in [n, *(v for v, _ in operands(g, n))]
               if g.nodes[u]["shape"]]  # fmt: skip
    W = 0
    for w in widths:
        W = gcd(W, w)
    W = W or 1
    if any(w // W > MAX_UNROLL for w in widths) or (reduced and W > MAX_BLOCK):
        return  # too many columns per thread: leave these to array code
    k.width, k.rows = W, bool(reduced)
    quoted: set[int] = set()
    loops = plan.loop_of()
    inputs: dict[tuple, Arg] = {}
    memo: dict[tuple[int, int | None, bool], str] = {}
    lines: list[str] = []

    def width(n: int) -> int:
        s = g.nodes[n]["shape"]
        return s[0] if s else 0

    def arg_for(u: int, delay: int, off: int | None, nxt: bool = False) -> str:
        """The text of u read at `delay` (from the next step with nxt) at column j + off."""
        base, shift = u, 0
        if u in plan.views and (delay or u not in mine or nxt):
            base = plan.views[u]
            shift = g.nodes[u]["attrs"]["start"]
        while not delay and base not in loops and g.nodes[base]["op"] == "slice":
            # a slice made once over the sequence is a strided view: read its source instead
            (src, k0), = operands(g, base)  # fmt: skip
            if k0:
                break
            shift += g.nodes[base]["attrs"]["start"]
            base = src
        key = (base, delay, nxt)
        if key not in inputs:
            d = g.nodes[base]
            V = width(base)
            if d["level"] == GLOBAL:
                kind = "vector" if V else "value"
                nxt_arg = False  # the same at every step
            else:
                kind = "row" if V else "per_b"
                nxt_arg = nxt
            a = Arg(base, delay, kind, V, name=f"in{len(inputs)}", ahead=nxt_arg)
            inputs[key] = a
        a = inputs[key]
        col = f"j + {off + shift}" if off is not None else None
        if a.kind == "value":
            text = a.name
        elif a.kind == "per_b":
            text = f"{a.name}[b]"
        elif col is None:
            raise NotFusable(u)  # a vector read where one number is wanted
        elif a.kind == "vector":
            text = f"{a.name}[{col}]"
        else:
            text = f"{a.name}[b * {a.width} + {col}]"
        return masked(text, base, delay, nxt, u, off)

    def masked(text: str, base: int, delay: int, nxt: bool, u: int, off: int | None) -> str:
        """The read, or its fill where the step read falls outside the sequence."""
        if not needs_mask(g, base, delay):
            return text
        key = (base, delay, nxt, "mask")
        if key not in inputs:
            inputs[key] = Arg(
                base, delay, "per_b", 0, mask=True, name=f"in{len(inputs)}", ahead=nxt
            )
        return f"pick_({inputs[key].name}[b], {text}, {fill_text(u, off)})"

    def fill_text(u: int, off: int | None) -> str:
        init = init_of(g, u)
        return "R(0)" if init is None else arg_for(init, 0, off)

    def value(u: int, delay: int, off: int | None, nxt: bool = False) -> str:
        d = g.nodes[u]
        if d["op"] == "const":
            return f"R({float(d['attrs']['value'])!r})"
        if nxt and delay == 0 and u in next_nodes:
            return ev(u, off, True)
        if nxt and delay == loop.direction and u in mine:
            return masked(ev(u, off), u, delay, nxt, u, off)  # this step's value, made here
        if delay or u not in mine or nxt:
            return arg_for(u, delay, off, nxt)
        return ev(u, off)

    def ev(n: int, off: int | None, nxt: bool = False) -> str:
        key = (n, off, nxt)
        if key in memo:
            return memo[key]
        d = g.nodes[n]
        if not d["shape"]:
            off = None
        ins = operands(g, n)
        if d["op"] == "slice":  # no work: the same value at other columns
            (u, dk), = ins  # fmt: skip
            memo[key] = value(u, dk, off + d["attrs"]["start"], nxt)
            return memo[key]
        if d["op"] == "concat":
            start = 0
            for u, dk in ins:
                w = width(u)
                if start <= off and off + W <= start + w:
                    memo[key] = value(u, dk, off - start, nxt)
                    return memo[key]
                start += w
            raise NotFusable(n)  # a thread's columns would straddle two parts
        op = OPS[d["op"]]
        if op.cuda_row is not None:
            row = row_value(n, nxt)
            if isinstance(row, str):
                memo[key] = row
            elif off % W:
                raise NotFusable(n)  # a column this thread does not hold
            else:
                memo[key] = row[off // W]
            return memo[key]
        args = [value(u, dk, off if width(u) else None, nxt) for u, dk in ins]
        fields = dict(d["attrs"])
        if op.arity is None:
            fields["args"] = op.sep.join(args)
        text = op.cuda.format(*args, **fields)
        var = f"{'ahead_' if nxt else ''}{label(n)}_{off if off is not None else 's'}"
        memo[key] = var
        quote(n)
        lines.append(f"    const real {var} = {text};")
        return var

    def quote(n: int) -> None:
        span = g.nodes[n]["span"]
        text = source_line(g, span)
        if text and (span.file, span.line) not in quoted:
            quoted.add((span.file, span.line))
            lines.append(f"    // {text}")

    def row_value(n: int, nxt: bool) -> list[str] | str:
        """n's texts at this thread's columns (one text for a scalar): a reduction over the
        row, each thread summing its columns, then the block (row_sum_ in CUDA_PRELUDE)."""
        key = (n, "row", nxt)
        if key not in memo:
            d = g.nodes[n]
            ins = operands(g, n)
            texts = [[value(u, dk, o, nxt) for o in range(0, width(u), W)] if width(u)
                     else value(u, dk, None, nxt) for u, dk in ins]  # fmt: skip
            quote(n)
            r = RowKernel(f"{'ahead_' if nxt else ''}{label(n)}", width(ins[0][0]), lines)
            out = OPS[d["op"]].cuda_row(r, *texts, **d["attrs"])
            memo[key] = r.let(out) if isinstance(out, str) else [r.let(t) for t in out]
        return memo[key]

    stores: list[tuple[Arg, str, str]] = []
    out_args: list[Arg] = []
    for o, nxt in [(o, False) for o in outs] + [(o, True) for o in next_outs]:
        V = width(o)
        a = Arg(o, 0, "row" if V else "per_b", V, out=True, name=f"out{len(out_args)}", ahead=nxt)
        out_args.append(a)
        if V:
            for off in range(0, V, W):
                var = ev(o, off, nxt)
                stores.append((a, f"{a.name}[b * {V} + j + {off}]", var))
        else:
            var = ev(o, None, nxt)
            stores.append((a, f"{a.name}[b]", var))
    k.args = list(inputs.values()) + out_args
    params = []
    for a in k.args:
        if a.mask:
            params.append(f"const bool* __restrict__ {a.name}")
        elif a.out:
            params.append(f"real* __restrict__ {a.name}")
        elif a.kind == "value":
            params.append(f"const real {a.name}")
        else:
            params.append(f"const real* __restrict__ {a.name}")
    if ahead:
        params.append("const int more")  # 0 at the last step: there is no next one
    body = [
        f'extern "C" __global__ void {k.name}({", ".join(params + ["const int n"])}) {{',
        "    const int i = blockIdx.x * blockDim.x + threadIdx.x;",
        "    if (i >= n) return;",
        f"    const int b = i / {W}, j = i % {W};",
        *([f"    __shared__ real rnnc_red[{W}];  // one block per row: its threads' parts"]
          if k.rows else []),
        *lines,
    ]  # fmt: skip
    for a, target, var in stores:
        guard = "if (j == 0) " if a.kind == "per_b" and W > 1 else ""
        if a.ahead:
            guard = "if (more) " + guard
        body.append(f"    {guard}{target} = {var};")
    body.append("}")
    k.source = "\n".join(body)


class RowKernel:
    """What an op's cuda_row rule writes with: named values, and sums and maxima over the
    row (all of the block's threads take part, each with the columns it holds)."""

    def __init__(self, prefix: str, width: int, lines: list[str]):
        self.prefix, self.width, self.lines = prefix, width, lines
        self.made = 0  # values named so far: prefix_r0, prefix_r1, ...

    def let(self, text: str) -> str:
        name = f"{self.prefix}_r{self.made}"
        self.made += 1
        self.lines.append(f"    const real {name} = {text};")
        return name

    def sum(self, texts: list[str]) -> str:
        return self.let(f"row_sum_({' + '.join(texts)}, rnnc_red)")

    def max(self, texts: list[str]) -> str:
        part = texts[0]
        for t in texts[1:]:
            part = f"max_({part}, {t})"
        return self.let(f"row_max_({part}, rnnc_red)")


def loop_kernels(
    plan: Plan, prefix: str, label: Callable[[int], str]
) -> dict[int, list[list[int] | Kernel]]:
    """Loop index in plan.steps -> its body as array code and kernels."""
    out = {}
    for i, s in enumerate(plan.steps):
        if isinstance(s, Loop):
            out[i] = kernels_for(plan.graph, plan, s, f"{prefix}_loop{i}", label)
    return out
