"""Graph -> Graph: rewrite rules run to a fixpoint — identities, common subexpressions,
constant folding, algebra, dead code — plus the two rules that matter for speed: hoisting
the input half of `W @ concat(h[t-1], x)` out of the recurrence, and gate fusion."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import networkx as nx
import numpy as np

from . import kernels
from .graph import Graph, add_op, copy_graph, init_of, operands, set_init, upstream
from .ops import GLOBAL, OPS, elementwise, render

TABLES = ("params", "inputs", "targets", "outputs", "grads", "adjoints")


# ----- graph surgery -----


def replace(g: Graph, old: int, new: int) -> None:
    """Every use of `old` (edges and the graph's tables) now reads `new`; `old` is removed.
    A read of old at t-k before the start read old's initial value: new takes it over."""
    init = init_of(g, old)
    if init is not None and init != new:
        assert init_of(g, new) in (None, init), "two initial values for one state"
        set_init(g, new, init)
    for _, v, d in list(g.out_edges(old, data=True)):
        g.add_edge(new, v, **d)
    d = g.nodes[old]
    for kind in TABLES:
        if kind == "adjoints" and not (d["name"] or d.get("adjoint")):
            continue  # as large as the graph; only adjoint or named nodes stand in it
        table = g.graph.get(kind) or {}
        for k, val in table.items():
            if val == old:
                table[k] = new
            elif isinstance(val, list):
                table[k] = [new if x == old else x for x in val]
    if g.graph.get("loss") == old:
        g.graph["loss"] = new
    g.remove_node(old)


def const_value(g: Graph, n: int) -> float | None:
    d = g.nodes[n]
    return d["attrs"]["value"] if d["op"] == "const" else None


def is_const(g: Graph, n: int, value: float) -> bool:
    return const_value(g, n) == value


def same_shape_level(g: Graph, a: int, b: int) -> bool:
    da, db = g.nodes[a], g.nodes[b]
    return da["shape"] == db["shape"] and da["level"] == db["level"]


def forward_into(g: Graph, n: int, x: int) -> bool:
    """Fold n, which equals operand x at every step, into x: x takes n's name and initial value."""
    if not same_shape_level(g, n, x):
        return False
    init_n, init_x = init_of(g, n), init_of(g, x)
    if init_n is not None and init_x is not None and init_n != init_x:
        return False
    if OPS[g.nodes[x]["op"]].kind == "leaf" and (init_n is not None or g.nodes[n]["name"]):
        return False
    if init_n is not None:
        set_init(g, x, init_n)
    dn, dx = g.nodes[n], g.nodes[x]
    if dn["name"] and not dx["name"]:
        dx["name"] = dn["name"]
    if "adjoint_of" in dn and "adjoint_of" not in dx:
        dx["adjoint_of"] = dn["adjoint_of"]
    if dn.get("adjoint") and not dx["name"]:
        dx["adjoint"] = True
    replace(g, n, x)
    return True


# ----- the rules: each takes (g, n) and returns True if it rewrote -----


def fold_identity(g: Graph, n: int) -> bool:
    """identity(x) -> x; sum(x) -> x  (same step only: a delayed read keeps its own fill)"""
    d = g.nodes[n]
    ins = operands(g, n)
    if d["op"] in ("identity", "sum") and len(ins) == 1 and ins[0][1] == 0:
        return forward_into(g, n, ins[0][0])
    return False


def drop_zero_terms(g: Graph, n: int) -> bool:
    """sum(x, 0, y) -> sum(x, y)"""
    d = g.nodes[n]
    if d["op"] != "sum":
        return False
    ins = operands(g, n)
    keep = [(u, k) for u, k in ins if not is_const(g, u, 0.0)]
    if len(keep) == len(ins) or not keep:
        return False
    rewire(g, n, keep)
    return True


def algebra(g: Graph, n: int) -> bool:
    """x*1 -> x, 1*x -> x, x+0 -> x, 0+x -> x, x-0 -> x, x/1 -> x, -(-x) -> x"""
    d = g.nodes[n]
    ins = operands(g, n)
    op = d["op"]
    if op == "neg" and g.nodes[ins[0][0]]["op"] == "neg" and ins[0][1] == 0:
        (inner, k), = operands(g, ins[0][0])  # fmt: skip
        if k == 0:
            return forward_into(g, n, inner)
    if len(ins) != 2 or any(k for _, k in ins):
        return False
    (a, _), (b, _) = ins
    unit = {"mul": 1.0, "div": 1.0, "add": 0.0, "sub": 0.0}.get(op)
    if unit is None:
        return False
    if is_const(g, b, unit):
        return forward_into(g, n, a)
    if op in ("mul", "add") and is_const(g, a, unit):
        return forward_into(g, n, b)
    return False


def fold_constants(g: Graph, n: int) -> bool:
    """an op of constants -> its value"""
    d = g.nodes[n]
    op = OPS[d["op"]]
    ins = operands(g, n)
    if op.kind != "pointwise" or not ins or d["shape"] != ():
        return False
    vals = [const_value(g, u) for u, _ in ins]
    if any(v is None for v in vals):
        return False
    text = render(op, [repr(v) for v in vals], d["attrs"], {})
    ns = {k: getattr(kernels, k) for k in dir(kernels) if not k.startswith("_")}
    value = float(eval(text, {**ns, "np": np}))
    c = add_op(g, "const", value=value)
    replace(g, n, c)
    return True


def rewire(g: Graph, n: int, ins: list[tuple[int, int]]) -> None:
    for u, _, key, e in list(g.in_edges(n, keys=True, data=True)):
        if e["pos"] != "init":
            g.remove_edge(u, n, key)
    for pos, (u, k) in enumerate(ins):
        g.add_edge(u, n, pos=pos, delay=k)


def pads_to_concat(g: Graph, n: int) -> bool:
    """pad(a, 0, n) + pad(b, |a|, n) + ... tiling [0, n) -> concat(a, b, ...)  (fused gates' adjoint)"""
    d = g.nodes[n]
    if d["op"] not in ("sum", "add"):
        return False
    ins = operands(g, n)
    if len(ins) < 2 or any(k for _, k in ins) or any(g.nodes[u]["op"] != "pad" for u, _ in ins):
        return False
    attrs = [g.nodes[u]["attrs"] for u, _ in ins]
    axis = attrs[0]["axis"]
    if any(a["axis"] != axis for a in attrs):
        return False
    parts = sorted((a["start"], operands(g, u)[0]) for a, (u, _) in zip(attrs, ins, strict=True))
    at = 0
    for start, (src, k) in parts:
        if start != at or k:
            return False
        at += g.nodes[src]["shape"][axis]
    if at != d["shape"][axis]:
        return False
    d["op"], d["attrs"] = "concat", {"axis": axis}
    rewire(g, n, [src for _, src in parts])
    return True


def fold_slices(g: Graph, n: int) -> bool:
    """x[..., 0:n] of an x n wide -> x; x[..., a:b][..., c:d] -> x[..., a+c:a+d]"""
    d = g.nodes[n]
    if d["op"] != "slice":
        return False
    (x, k), = operands(g, n)  # fmt: skip
    if k:
        return False
    a = d["attrs"]
    if a["start"] == 0 and a["stop"] == g.nodes[x]["shape"][-1]:
        return forward_into(g, n, x)
    if g.nodes[x]["op"] == "slice" and not g.nodes[x]["name"]:
        (inner, ki), = operands(g, x)  # fmt: skip
        if ki == 0:
            base = g.nodes[x]["attrs"]["start"]
            a["start"], a["stop"] = base + a["start"], base + a["stop"]
            rewire(g, n, [(inner, 0)])
            return True
    return False


def slice_of(g: Graph, n: int) -> tuple[int, int, int] | None:
    """(x, start, stop) when n is a same-step slice of x's last axis."""
    d = g.nodes[n]
    if d["op"] != "slice":
        return None
    (x, k), = operands(g, n)  # fmt: skip
    return None if k else (x, d["attrs"]["start"], d["attrs"]["stop"])


def join_slices(g: Graph, n: int) -> bool:
    """concat(x[..., a:b], x[..., b:c], ...) -> x[..., a:c]"""
    d = g.nodes[n]
    if d["op"] != "concat" or d["attrs"].get("axis", -1) != -1 or init_of(g, n) is not None:
        return False
    parts = [slice_of(g, u) if k == 0 else None for u, k in operands(g, n)]
    if not parts or any(p is None or p[0] != parts[0][0] for p in parts):
        return False
    if any(p[2] != q[1] for p, q in itertools.pairwise(parts)):
        return False
    d["op"], d["attrs"] = "slice", {"start": parts[0][1], "stop": parts[-1][2], "axis": -1}
    rewire(g, n, [(parts[0][0], 0)])
    return True


def factor(g: Graph, n: int) -> bool:
    """a*b + a*c -> a*(b + c); -(a*b) + a*c -> a*(c - b)  (GRU's dz = dh*h[t-1] - dh*n)"""
    d = g.nodes[n]
    if d["op"] not in ("add", "sum") or init_of(g, n) is not None:
        return False
    ins = operands(g, n)
    if len(ins) != 2 or any(k for _, k in ins):
        return False
    terms = []
    for u, _ in ins:
        neg = g.nodes[u]["op"] == "neg" and not g.nodes[u]["name"] and g.out_degree(u) == 1
        if neg:
            ((u, k),) = operands(g, u)
            if k:
                return False
        if g.nodes[u]["op"] != "mul" or g.nodes[u]["name"] or g.out_degree(u) != 1:
            return False
        terms.append((neg, operands(g, u)))
    (neg1, f1), (neg2, f2) = terms
    if neg1 and neg2:
        return False
    common = [x for x in f1 if x in f2]
    if not common:
        return False
    a = common[0]
    b = next(x for x in f1 if x != a) if f1[0] != f1[1] else a
    c = next(x for x in f2 if x != a) if f2[0] != f2[1] else a
    if neg1:
        b, c = c, b
    op = "sub" if neg1 or neg2 else "add"
    inner = add_op(g, op, [b, c], span=d["span"])
    if g.nodes[inner]["shape"] != d["shape"] and g.nodes[a[0]]["shape"] != d["shape"]:
        g.remove_node(inner)
        return False
    d["op"] = "mul"
    rewire(g, n, [a, (inner, 0)])
    return True


def merge_delayed_terms(g: Graph, n: int) -> bool:
    """a[t+1] + b[t+1] -> (a + b)[t+1] for a, b with no initial value (adjoints): the backward
    loop keeps one running sum for the next step, as hand-written BPTT does, not two arrays."""
    d = g.nodes[n]
    if d["op"] not in ("sum", "add"):
        return False
    groups: dict[tuple, list[int]] = {}
    for u, k in operands(g, n):
        du = g.nodes[u]
        if k and init_of(g, u) is None and du["shape"] == d["shape"]:
            groups.setdefault((k, du["level"]), []).append(u)
    for (k, _), us in groups.items():
        if len(us) < 2:
            continue
        total = add_op(g, "sum", [(u, 0) for u in sorted(us)], span=d["span"])
        if "adjoint_of" in d:
            g.nodes[total]["adjoint_of"] = d["adjoint_of"]  # named after it: dh's carried part
        rest = [(u, j) for u, j in operands(g, n) if not (j == k and u in us)]
        d["op"] = "sum"
        rewire(g, n, [*rest, (total, k)])
        return True
    return False


def merge_edge_sums(g: Graph, n: int) -> bool:
    """edge_sum(a, k) + edge_sum(b, k) -> edge_sum(a + b, k): the initial state's adjoint
    reads the same running sum (merge_delayed_terms) instead of keeping a and b."""
    d = g.nodes[n]
    if d["op"] not in ("sum", "add"):
        return False
    groups: dict[str, list[int]] = {}
    for u, k in operands(g, n):
        du = g.nodes[u]
        if not k and du["op"] == "edge_sum" and g.out_degree(u) == 1:
            groups.setdefault(repr(sorted(du["attrs"].items())), []).append(u)
    for es in groups.values():
        srcs = [operands(g, e)[0] for e in es]
        if len(es) < 2 or any(k for _, k in srcs):
            continue
        if len({(g.nodes[u]["shape"], g.nodes[u]["level"]) for u, _ in srcs}) > 1:
            continue
        total = add_op(g, "sum", sorted(srcs), span=d["span"])
        merged = add_op(g, "edge_sum", [(total, 0)], span=d["span"], **g.nodes[es[0]]["attrs"])
        rest = [(u, j) for u, j in operands(g, n) if u not in es]
        d["op"] = "sum"
        rewire(g, n, [*rest, (merged, 0)])
        return True
    return False


SUMS = [
    fold_identity,
    drop_zero_terms,
    pads_to_concat,
    factor,
    merge_delayed_terms,
    merge_edge_sums,
]
# op -> the rules that can rewrite a node of that op (a table: a node meets only its own rules)
RULES: dict[str, list[Callable[[Graph, int], bool]]] = {
    "identity": [fold_identity],
    "sum": SUMS,
    "add": [algebra, pads_to_concat, factor, merge_delayed_terms, merge_edge_sums],
    "mul": [algebra],
    "div": [algebra],
    "sub": [algebra],
    "neg": [algebra],
    "slice": [fold_slices],
    "concat": [join_slices],
}


# ----- whole-graph passes -----


def cse(g: Graph) -> bool:
    """Two nodes with the same op, attrs and operands are one."""
    seen: dict[tuple, int] = {}
    changed = False
    for n in sorted(
        g.nodes
    ):  # creation order: operands first, nearly always; the fixpoint does the rest
        if n not in g:
            continue
        d = g.nodes[n]
        if OPS[d["op"]].kind == "leaf" and d["op"] != "const":
            continue
        key = (d["op"], repr(sorted(d["attrs"].items())), tuple(operands(g, n)), init_of(g, n),
               d["shape"], d["level"])  # fmt: skip
        other = seen.get(key)
        if other is None:
            seen[key] = n
            continue
        if d["name"] and g.nodes[other]["name"]:
            continue  # two named variables stay two: they are what the user reads
        if d["name"]:
            g.nodes[other]["name"] = d["name"]
        replace(g, n, other)
        changed = True
    return changed


def roots(g: Graph) -> set[int]:
    keep: set[int] = set()
    for kind in TABLES:
        for v in (g.graph.get(kind) or {}).values():
            keep |= set(v) if isinstance(v, list) else {v}
    if g.graph.get("loss") is not None:
        keep.add(g.graph["loss"])
    return keep


def dead_code(g: Graph) -> bool:
    live = upstream(g, [r for r in roots(g) if r in g])
    dead = [n for n in g.nodes if n not in live]
    g.remove_nodes_from(dead)
    return bool(dead)


def in_loop(g: Graph) -> dict[int, int]:
    """Node -> id of the recurrence (strongly connected component) it belongs to."""
    out = {}
    for i, comp in enumerate(nx.strongly_connected_components(g)):
        if len(comp) > 1 or any(g.has_edge(n, n) for n in comp):
            for n in comp:
                out[n] = i
    return out


def split_concat_matmul(g: Graph) -> bool:
    """W @ concat(h[t-1], x) -> W[:, :H] @ h[t-1] + W[:, H:] @ x when x is outside the loop,
    so that the x half runs once over the whole sequence as one GEMM."""
    loops = in_loop(g)
    changed = False
    for n in list(g.nodes):
        d = g.nodes.get(n)
        if d is None or d["op"] != "matmul":
            continue
        (w, kw), (z, kz) = operands(g, n)
        if g.nodes[z]["op"] != "concat" or kz or g.nodes[w]["level"] != GLOBAL or init_of(g, z):
            continue
        parts = operands(g, z)
        here = loops.get(n)
        if here is None or all(loops.get(p) == here for p, _ in parts):
            continue
        start, terms = 0, []
        for p, k in parts:
            width = g.nodes[p]["shape"][0]
            cols = add_op(
                g, "slice", [(w, kw)], span=d["span"], start=start, stop=start + width, axis=-1
            )
            terms.append(add_op(g, "matmul", [(cols, 0), (p, k)], span=d["span"]))
            start += width
        total = terms[0]
        for t in terms[1:]:
            total = add_op(g, "add", [(total, 0), (t, 0)], span=d["span"])
        g.nodes[total]["name"] = d["name"]
        replace(g, n, total)
        changed = True
    return changed


def sum_terms(g: Graph, n: int, loop: int | None, loops: dict[int, int]) -> list[tuple[int, int]]:
    """The terms of the sum tree under add n: through unnamed adds used once, same step."""
    out = []
    for u, k in operands(g, n):
        d = g.nodes[u]
        if (k == 0 and d["op"] == "add" and not d["name"] and g.out_degree(u) == 1
                and loops.get(u) == loop and init_of(g, u) is None):  # fmt: skip
            out += sum_terms(g, u, loop, loops)
        else:
            out.append((u, k))
    return out


def join_step_gemms(g: Graph) -> bool:
    """A @ x + B @ y inside a loop, x and y both values of the loop (at any delay) and A, B
    model-wide with as many rows -> [A B] @ concat(x, y): one GEMM a step instead of two, and
    one for the adjoint (input feeding's W_ih @ ht[t-1] + W_hh @ h[t-1] in a decoder)."""
    loops = in_loop(g)
    changed = False
    for n in list(g.nodes):
        d = g.nodes.get(n)
        if d is None or d["op"] != "add" or n not in loops or d["pair"]:
            continue
        (v, e), *rest = [(v, e) for _, v, e in g.out_edges(n, data=True)] or [(None, None)]
        if not d["name"] and not rest and v is not None and g.nodes[v]["op"] == "add" and e["delay"] == 0 \
                and loops.get(v) == loops[n] and init_of(g, n) is None:  # fmt: skip
            continue  # an inner add: its tree's root joins them
        terms = sum_terms(g, n, loops[n], loops)
        groups: dict[int, list[int]] = {}
        for u, k in terms:
            du = g.nodes[u]
            if k or du["op"] != "matmul" or du["name"] or g.out_degree(u) != 1 or loops.get(u) != loops[n]:
                continue
            (w, kw), (x, _) = operands(g, u)
            if kw == 0 and g.nodes[w]["level"] == GLOBAL and loops.get(x) == loops[n] and not du["pair"]:
                groups.setdefault(g.nodes[w]["shape"][0], []).append(u)
        group = next((ms for ms in groups.values() if len(ms) > 1), None)
        if group is None:
            continue
        span = d["span"]
        ws = add_op(g, "concat", [operands(g, m)[0] for m in group], span=span, axis=-1)
        xs = add_op(g, "concat", [operands(g, m)[1] for m in group], span=span, axis=-1)
        total = add_op(g, "matmul", [(ws, 0), (xs, 0)], span=span)
        for u, k in terms:
            if u not in group:
                total = add_op(g, "add", [(total, 0), (u, k)], span=span)
        g.nodes[total]["name"] = d["name"]
        replace(g, n, total)
        changed = True
    return changed


def hoist_invariant_terms(g: Graph) -> bool:
    """(x + b) + c -> x + (b + c) when x changes each step of a loop and b, c do not:
    b + c then runs once over the whole sequence (the bias joins the input projection)."""
    loops = in_loop(g)
    changed = False
    for n in list(g.nodes):
        d = g.nodes.get(n)
        if d is None or d["op"] != "add" or n not in loops:
            continue
        (a, ka), (c, kc) = operands(g, n)
        if c in loops:
            (a, ka), (c, kc) = (c, kc), (a, ka)
        if ka or kc or c in loops or g.nodes[a]["op"] != "add" or a not in loops:
            continue
        if g.out_degree(a) != 1 or g.nodes[a]["name"] or init_of(g, a) is not None:
            continue
        (x, kx), (b, kb) = operands(g, a)
        if b in loops:
            (x, kx), (b, kb) = (b, kb), (x, kx)
        if kb or b in loops or x not in loops:
            continue
        inv = add_op(g, "add", [(b, 0), (c, 0)], span=g.nodes[a]["span"])
        rewire(g, n, [(x, kx), (inv, 0)])
        g.remove_node(a)
        changed = True
    return changed


def fuse_gates(g: Graph) -> bool:
    """W1 @ z, W2 @ z, ... (same operand z, same delay) -> one [W1; W2; ...] @ z, sliced after:
    one GEMM per step instead of one per gate. The adjoint fuses too (pads_to_concat)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for n, d in g.nodes(data=True):
        if d["op"] == "matmul":
            (w, kw), (z, kz) = operands(g, n)
            if g.nodes[w]["level"] == GLOBAL and kw == 0 and "adjoint_of" not in d:
                groups.setdefault((z, kz), []).append(n)
    changed = False
    for (z, kz), mms in groups.items():
        if len(mms) < 2:
            continue
        mms.sort()
        ws = [operands(g, m)[0][0] for m in mms]
        span = g.nodes[mms[0]]["span"]
        stacked = add_op(g, "concat", [(w, 0) for w in ws], span=span, axis=-2)
        fused = add_op(g, "matmul", [(stacked, 0), (z, kz)], span=span)
        start = 0
        for m in mms:
            rows = g.nodes[m]["shape"][0]
            part = add_op(g, "slice", [(fused, 0)], span=g.nodes[m]["span"], start=start,
                          stop=start + rows, axis=-1)  # fmt: skip
            g.nodes[part]["name"] = g.nodes[m]["name"]
            replace(g, m, part)
            start += rows
        changed = True
    return changed


def read_parts_through_concat(g: Graph) -> bool:
    """Outside a loop, read a part of a concat made in the loop as a slice of the concat:
    the concat is kept for every step anyway, so the part needs no buffer of its own
    (the fused gates' adjoints: the bias gradients read slices of one [T, B, 4H] array)."""
    loops = in_loop(g)
    changed = False
    for c in list(g.nodes):
        d = g.nodes[c]
        if d["op"] != "concat" or d["attrs"].get("axis", -1) != -1 or c not in loops:
            continue
        start = 0
        for a, k in operands(g, c):
            width = g.nodes[a]["shape"][-1]
            outside = [
                (v, key, e) for _, v, key, e in g.out_edges(a, keys=True, data=True)
                if loops.get(v) != loops[c] and e["delay"] == 0 and e["pos"] != "init"
            ]  # fmt: skip
            if k == 0 and loops.get(a) == loops[c] and outside:
                part = add_op(g, "slice", [(c, 0)], span=g.nodes[a]["span"], start=start,
                              stop=start + width, axis=-1)  # fmt: skip
                for v, key, e in outside:
                    g.remove_edge(a, v, key)
                    g.add_edge(part, v, **e)
                changed = True
            start += width
    return changed


def tiles(parts: list[tuple[int, int]], width: int) -> bool:
    """Ranges (start, stop), sorted, cover [0, width) exactly."""
    at = 0
    for start, stop in parts:
        if start != at:
            return False
        at = stop
    return at == width


def joins_safely(g: Graph, members: list[int], sources: list[int]) -> bool:
    """May one new node read every `source` and feed every `member`? Not when it would close
    a same-step cycle (an algebraic loop: a source computed from a member in the same step),
    nor when the cycle it closes through delayed edges would join two recurrences, or pull a
    value computed once into a recurrence (the forward and backward loops of one input)."""
    same = nx.DiGraph(
        (u, v) for u, v, e in g.edges(data=True) if e["delay"] == 0 and e["pos"] != "init"
    )
    same.add_nodes_from(members)
    reach_same = set(members).union(*(nx.descendants(same, m) for m in members))
    if reach_same & set(sources):  # (a member may itself be another member's source)
        return False
    down = set(members).union(*(nx.descendants(g, m) for m in members))
    up = set(sources).union(*(nx.ancestors(g, s) for s in sources))
    cycle = down & up
    if not cycle:
        return True
    loops = in_loop(g)
    ids = {loops.get(n) for n in cycle}
    return len(ids) == 1 and None not in ids


def fuse_bias(g: Graph) -> bool:
    """x[..., 0:H] + b1, x[..., H:2H] + b2, ... tiling x -> (x + concat(b1, b2, ...))[..., 0:H], ...:
    the per-gate bias adds of fused gates become one add over all gates."""
    groups: dict[int, list[tuple[int, int, int, int]]] = {}
    for n, d in g.nodes(data=True):
        if d["op"] != "add" or init_of(g, n) is not None:
            continue
        ins = operands(g, n)
        for i in (0, 1):
            s, (b, kb) = slice_of(g, ins[i][0]), ins[1 - i]
            if s and not ins[i][1] and not kb and g.nodes[b]["shape"] == d["shape"]:
                groups.setdefault(s[0], []).append((s[1], s[2], b, n))
                break
    changed = False
    for x, adds in groups.items():
        adds.sort()
        levels = {g.nodes[b]["level"] for _, _, b, _ in adds}
        if len(adds) < 2 or len(levels) > 1 or not tiles([(a, z) for a, z, _, _ in adds],
                                                          g.nodes[x]["shape"][-1]):  # fmt: skip
            continue
        if not joins_safely(g, [n for *_, n in adds], [x, *(b for _, _, b, _ in adds)]):
            continue
        span = g.nodes[adds[0][3]]["span"]
        bias = add_op(g, "concat", [(b, 0) for _, _, b, _ in adds], span=span, axis=-1)
        total = add_op(g, "add", [(x, 0), (bias, 0)], span=span)
        for start, stop, _, n in adds:
            g.nodes[n]["op"], g.nodes[n]["attrs"] = (
                "slice",
                {"start": start, "stop": stop, "axis": -1},
            )
            rewire(g, n, [(total, 0)])
        changed = True
    return changed


def runs(members: list[tuple]) -> list[list[tuple]]:
    """(start, stop, ...) sorted -> maximal runs of adjacent ranges, two or more long."""
    out, run = [], [members[0]]
    for m in members[1:]:
        if m[0] == run[-1][1]:
            run.append(m)
        else:
            out.append(run)
            run = [m]
    out.append(run)
    return [r for r in out if len(r) > 1]


def add_slices(g: Graph) -> bool:
    """x[..., a:b] + y[..., a:b], x[..., b:c] + y[..., b:c] -> (x[..., a:c] + y[..., a:c]) sliced:
    with the slices of fused gates, one add per step over adjacent gates, not one per gate."""
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for n, d in g.nodes(data=True):
        if d["op"] != "add" or init_of(g, n) is not None:
            continue
        (a, ka), (b, kb) = operands(g, n)
        sa, sb = slice_of(g, a), slice_of(g, b)
        if ka or kb or not sa or not sb or sa[1:] != sb[1:]:
            continue
        if g.nodes[sa[0]]["shape"] == g.nodes[sb[0]]["shape"]:
            groups.setdefault((sa[0], sb[0]), []).append((sa[1], sa[2], n))
    changed = False
    for (x, y), adds in groups.items():
        for run in runs(sorted(adds)):
            if not joins_safely(g, [n for *_, n in run], [x, y]):
                continue
            lo, hi, span = run[0][0], run[-1][1], g.nodes[run[0][2]]["span"]
            xs, ys = (add_op(g, "slice", [(v, 0)], span=span, start=lo, stop=hi) for v in (x, y))
            total = add_op(g, "add", [(xs, 0), (ys, 0)], span=span)
            for start, stop, n in run:
                g.nodes[n]["op"] = "slice"
                g.nodes[n]["attrs"] = {"start": start - lo, "stop": stop - lo, "axis": -1}
                rewire(g, n, [(total, 0)])
            changed = True
    return changed


def merge_unary_slices(g: Graph) -> bool:
    """f(x[..., a:b]), f(x[..., b:c]) -> f(x[..., a:c]) sliced after, for a pointwise f of one
    operand: the sigmoid of adjacent gates is one call (LSTM's f and i, GRU's r and z)."""
    groups: dict[tuple, list[tuple[int, int, int]]] = {}
    for n, d in g.nodes(data=True):
        op = OPS[d["op"]]
        if not elementwise(op) or op.arity != 1 or init_of(g, n) is not None:
            continue  # (a slice of a slice is no elementwise op: x[0:8][0:4] != x[0:4] parts)
        (u, k), = operands(g, n)  # fmt: skip
        s = slice_of(g, u)
        if s and not k:
            groups.setdefault((d["op"], repr(sorted(d["attrs"].items())), s[0]), []).append(
                (s[1], s[2], n)
            )
    changed = False
    for (_, _, x), members in groups.items():
        for run in runs(sorted(members)):
            first = run[0][2]
            d = g.nodes[first]
            part = add_op(g, "slice", [(x, 0)], span=d["span"], start=run[0][0], stop=run[-1][1],
                          axis=-1)  # fmt: skip
            whole = add_op(g, d["op"], [(part, 0)], span=d["span"], **d["attrs"])
            for start, stop, n in run:
                g.nodes[n]["op"] = "slice"
                g.nodes[n]["attrs"] = {
                    "start": start - run[0][0],
                    "stop": stop - run[0][0],
                    "axis": -1,
                }
                rewire(g, n, [(whole, 0)])
            changed = True
    return changed


def simplify(g: Graph) -> None:
    for _ in range(50):
        changed = False
        for n in list(g.nodes):
            d = g.nodes.get(n)
            if d is None:
                continue
            if d["shape"] == () and OPS[d["op"]].kind == "pointwise" and fold_constants(g, n):
                changed = True
                continue
            for rule in RULES.get(d["op"], ()):
                if rule(g, n):
                    changed = True
                    break  # n may be another op now, or gone: the next pass sees it afresh
        changed |= cse(g)
        changed |= dead_code(g)
        if not changed:
            return


def optimize(g: Graph, fuse: bool = True) -> Graph:
    """A simplified copy of g; with `fuse`, input projections hoisted and gates fused."""
    g = copy_graph(g)
    simplify(g)
    if fuse and "grads" in g.graph and read_parts_through_concat(g):
        simplify(g)
    if fuse and "grads" not in g.graph:
        if split_concat_matmul(g):
            simplify(g)
        if join_step_gemms(g):
            simplify(g)
        if fuse_gates(g):
            simplify(g)
        while hoist_invariant_terms(g):
            simplify(g)
        # each turns the nodes it rewrites into slices, which the next one reads: one cleanup
        if any([fuse_bias(g), add_slices(g), merge_unary_slices(g)]):
            simplify(g)
    return g
