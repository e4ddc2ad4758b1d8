"""Graph -> Plan: strongly connected components of the delay graph become time loops (the
direction from the sign of their delays); everything else runs once over the whole sequence,
so input projections and weight gradients become single large matrix products."""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from .errors import RnncError
from .graph import Graph, init_of, is_seq, label, upstream
from .ops import OPS, STATIC


@dataclass
class Once:
    node: int


@dataclass
class Loop:
    dom: str
    direction: int  # +1: t = 0..T-1; -1: t = T-1..0
    nodes: list[int]  # in same-step dependency order


@dataclass
class Plan:
    graph: Graph
    steps: list[Once | Loop]
    wanted: dict[str, int]  # result name -> node
    pads: dict[int, tuple[int, int]] = field(default_factory=dict)  # node -> (past, future) rows
    stored: set[int] = field(default_factory=set)  # loop nodes whose every step is kept
    views: dict[int, int] = field(default_factory=dict)  # stored slice -> its stored base
    # stored adjoints a target may keep as one running [B, ...] value instead of T + 1 rows
    running: set[int] = field(default_factory=set)
    # sums over a loop's steps (reduce_to one value per sequence) added up inside the loop
    accumulate: set[int] = field(default_factory=set)

    def loop_of(self) -> dict[int, int]:
        return {n: i for i, s in enumerate(self.steps) if isinstance(s, Loop) for n in s.nodes}


def needed(g: Graph, wanted: dict[str, int]) -> set[int]:
    return upstream(g, wanted.values())


def components(g: Graph) -> nx.DiGraph:
    """The condensation of the whole graph: its strongly connected components as a DAG.
    Every plan keeps a set closed under dependencies, so its components are among these."""
    return nx.condensation(g)


def schedule(g: Graph, wanted: dict[str, int], cond: nx.DiGraph | None = None) -> Plan:
    """The steps that compute `wanted`, each node once, in an order that respects every edge."""
    keep = needed(g, wanted)
    cond = components(g) if cond is None else cond
    mapping = cond.graph["mapping"]
    kept = {mapping[n] for n in keep}
    comps = {c: sorted(cond.nodes[c]["members"]) for c in kept}
    # forward work before adjoint work, each in creation order: readable and memory-friendly
    topo = nx.lexicographical_topological_sort(cond.subgraph(kept), key=lambda c: min(comps[c]))
    steps: list[Once | Loop] = []
    for c in topo:
        nodes = comps[c]
        if len(nodes) == 1 and not g.has_edge(nodes[0], nodes[0]):
            steps.append(Once(nodes[0]))
            continue
        steps.append(make_loop(g, nodes))
    steps = sink_elementwise(g, steps, set(wanted.values()), keep)
    steps, accumulate = accumulators(g, steps, set(wanted.values()), keep)
    plan = Plan(g, steps, dict(wanted), accumulate=accumulate)
    plan.pads = pads(g, keep)
    loops = plan.loop_of()
    for n, i in loops.items():
        outside = any(
            v in keep and (loops.get(v) != i or d["delay"] != 0)
            for _, v, d in g.out_edges(n, data=True)
        )
        if outside or n in wanted.values() or plan.pads.get(n, (0, 0)) != (0, 0):
            plan.stored.add(n)
    plan.stored -= plan.accumulate  # one running value, not a row a step
    plan.views = views(g, plan, loops)
    plan.stored -= set(plan.views)
    plan.stored |= set(plan.views.values())
    plan.running = running(g, plan, loops, keep)
    return plan


def running(g: Graph, plan: Plan, loops: dict[int, int], keep: set[int]) -> set[int]:
    """Adjoints that a backward loop hands only to its next step (t-1) and, after the loop,
    to an initial state's gradient at delay 1 (which is their step-0 value, every sequence
    starting at step 0): hand-written BPTT's running dh_next, not a [T + 1, B, ...] array."""
    out = set()
    for n, i in loops.items():
        if (plan.steps[i].direction > 0 or plan.pads.get(n) != (0, 1) or n not in plan.stored
                or n in plan.wanted.values() or n in plan.views.values() or init_of(g, n) is not None):  # fmt: skip
            continue
        uses = [(v, e["delay"]) for _, v, e in g.out_edges(n, data=True) if v in keep]
        if all((loops.get(v) == i and k == -1)
               or (k == 0 and g.nodes[v]["op"] == "edge_sum" and g.nodes[v]["attrs"]["k"] == 1)
               for v, k in uses):  # fmt: skip
            out.add(n)
    return out


def views(g: Graph, plan: Plan, loops: dict[int, int]) -> dict[int, int]:
    """Stored same-step slices of a value of their own loop: keep the whole value once and
    read the slice of it later (an LSTM's f and i are halves of one sigmoid: one buffer)."""
    out = {}
    for n in plan.stored:
        d = g.nodes[n]
        if d["op"] != "slice" or n in plan.wanted.values() or n in plan.pads:
            continue
        ((x, k),) = [(u, e["delay"]) for u, _, e in g.in_edges(n, data=True)]
        if k == 0 and loops.get(x) == loops[n] and x not in plan.pads:
            out[n] = x
    return {n: x for n, x in out.items() if x not in out}  # a view of a view: keep it simple


def sink_elementwise(
    g: Graph, steps: list[Once | Loop], wanted: set[int], keep: set[int]
) -> list[Once | Loop]:
    """Move an elementwise step that reads a loop's output, and whose every reader sits in one
    later loop, into that loop: over the whole sequence it only adds a [T, B, ...] array to
    fill and read back (1 - y*y, tanh' from the forward loop's y, read by the backward loop)."""
    loop_of = {n: s for s in steps if isinstance(s, Loop) for n in s.nodes}
    changed = True
    while changed:
        changed = False
        for s in list(steps):
            if not isinstance(s, Once):
                continue
            n, d = s.node, g.nodes[s.node]
            if not movable(g, n) or n in wanted:
                continue
            if not any(u in loop_of for u in g.pred[n]):
                continue  # it reads only values made before any loop: hoisted on purpose
            readers = {id(loop_of.get(v)) for _, v in g.out_edges(n) if v in keep}
            if len(readers) != 1 or id(None) in readers:
                continue
            target = next(loop_of[v] for _, v in g.out_edges(n) if v in keep)
            if (
                any(e["delay"] for _, v, e in g.out_edges(n, data=True) if v in keep)
                or target.dom != d["level"]
            ):
                continue
            steps.remove(s)
            target.nodes = body_order(g, [*target.nodes, n])
            loop_of[n] = target
            changed = True
    return steps


def movable(g: Graph, n: int) -> bool:
    """An elementwise value over the whole sequence (no GEMM, no delayed read), which a loop
    over its domain may compute a step at a time instead."""
    d = g.nodes[n]
    if OPS[d["op"]].kind != "pointwise" or d["op"] in ("matmul", "matmul_t") or not is_seq(d["level"]):
        return False
    return not any(e["delay"] for _, _, e in g.in_edges(n, data=True))


def positions(steps: list[Once | Loop]) -> dict[int, int]:
    return {n: i for i, x in enumerate(steps) for n in (x.nodes if isinstance(x, Loop) else [x.node])}


def accumulators(
    g: Graph, steps: list[Once | Loop], wanted: set[int], keep: set[int]
) -> tuple[list[Once | Loop], set[int]]:
    """A sum over a loop's steps down to one value per sequence (reduce_to, e.g. the adjoint of
    attention's e[s] gathered from every decoder step) of a term the loop computes each step,
    or of an elementwise term of its values read by nothing else: the loop adds each step's
    term to a running value, and no [T, ...] array of the terms is kept."""
    loop_of = {n: s for s in steps if isinstance(s, Loop) for n in s.nodes}
    out: set[int] = set()
    for s in list(steps):
        if not isinstance(s, Once) or g.nodes[s.node]["op"] != "reduce_to" or g.nodes[s.node]["level"] != STATIC:
            continue
        r = s.node
        ((u, k),) = [(u, e["delay"]) for u, _, e in g.in_edges(r, data=True)]
        loop = loop_of.get(u)
        if k or u in wanted:
            continue
        if loop is None:
            loop = sunk_term(g, steps, loop_of, u, r, keep)
            if loop is None:
                continue
        if loop.dom != g.nodes[u]["level"]:
            continue
        steps.remove(s)
        loop.nodes = body_order(g, [*loop.nodes, r])
        loop_of[r] = loop
        out.add(r)
    return steps, out


def sunk_term(g: Graph, steps: list[Once | Loop], loop_of: dict, u: int, r: int, keep: set[int]) -> Loop | None:
    """Move u, an elementwise step over the whole sequence read only by r, into the loop whose
    values it reads (its other operands come before that loop); that loop, or None."""
    step = next((x for x in steps if isinstance(x, Once) and x.node == u), None)
    if step is None or not movable(g, u) or {v for v in g.successors(u) if v in keep} != {r}:
        return None
    at = positions(steps)
    loops = [loop_of[x] for x in g.predecessors(u) if x in loop_of]
    if not loops:
        return None
    loop = max(loops, key=lambda x: at[x.nodes[0]])  # the last loop it reads: the rest is made before
    if loop.dom != g.nodes[u]["level"]:
        return None
    for x in g.predecessors(u):
        if x in loop.nodes or at.get(x, -1) < at[loop.nodes[0]]:
            continue
        early = next((y for y in steps if isinstance(y, Once) and y.node == x), None)
        if early is None or any(at.get(y, -1) > at[loop.nodes[0]] for y in g.predecessors(x)):
            return None
        steps.remove(early)  # (a view of a value made before the loop, listed after it)
        steps.insert(steps.index(loop), early)
        at = positions(steps)
    steps.remove(step)
    loop.nodes = body_order(g, [*loop.nodes, u])
    loop_of[u] = loop
    return loop


def body_order(g: Graph, nodes: list[int]) -> list[int]:
    inside = set(nodes)
    same = nx.DiGraph()
    same.add_nodes_from(nodes)
    same.add_edges_from(
        (u, v) for u, v, d in g.edges(nodes, data=True) if v in inside and d["delay"] == 0
    )
    return list(nx.lexicographical_topological_sort(same))


def make_loop(g: Graph, nodes: list[int]) -> Loop:
    comp = set(nodes)
    delays = {d["delay"] for u, v, d in g.edges(nodes, data=True) if v in comp and d["delay"]}
    levels = {g.nodes[n]["level"] for n in nodes}
    bad = [
        n
        for n in nodes
        if not is_seq(g.nodes[n]["level"]) or OPS[g.nodes[n]["op"]].kind != "pointwise"
    ]
    if bad or len(levels) != 1:
        n = bad[0] if bad else nodes[0]
        raise RnncError(
            f"'{label(g, n)}' takes part in a recurrence but needs the whole sequence at once",
            g.nodes[n]["span"],
            hint="a step cannot depend on last(...), first(...) or a loss of its own recurrence",
            code="E410",
        )
    if any(k > 0 for k in delays) and any(k < 0 for k in delays):
        raise RnncError(
            "a recurrence reads both earlier and later steps",
            g.nodes[nodes[0]]["span"],
            code="E407",
        )
    direction = -1 if any(k < 0 for k in delays) else 1
    return Loop(levels.pop(), direction, body_order(g, nodes))


def pads(g: Graph, keep: set[int]) -> dict[int, tuple[int, int]]:
    """Rows of initial (or final) values each sequence needs around its T steps."""
    out: dict[int, tuple[int, int]] = {}
    for u, v, d in g.edges(data=True):
        k = d["delay"]
        if k == 0 or u not in keep or v not in keep:
            continue
        past, fut = out.get(u, (0, 0))
        out[u] = (max(past, k), fut) if k > 0 else (past, max(fut, -k))
    return out


def describe(plan: Plan) -> str:
    """The plan as text: one line per step (for `rnnc compile --plan` and tests)."""
    g = plan.graph
    lines = []
    for s in plan.steps:
        if isinstance(s, Once):
            lines.append(f"once {label(g, s.node)} = {g.nodes[s.node]['op']}")
        else:
            way = "forward" if s.direction > 0 else "backward"
            names = ", ".join(label(g, n) for n in s.nodes)
            lines.append(f"loop {way} over {s.dom}: {names}")
    return "\n".join(lines)
