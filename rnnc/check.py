"""Graph -> Graph: algebraic loops, recurrences that mix past and future, unused inputs and
params (warnings), a missing loss where one is needed."""

from __future__ import annotations

import networkx as nx

from .errors import RnncError, Span, Warning_
from .graph import Graph, label


def same_step(g: Graph) -> nx.DiGraph:
    d = nx.DiGraph()
    d.add_nodes_from(g.nodes)
    d.add_edges_from((u, v) for u, v, e in g.edges(data=True) if e["delay"] == 0)
    return d


def short(g: Graph, n: int) -> str:
    return label(g, n)


def algebraic_loops(g: Graph) -> None:
    """A cycle whose delays sum to 0 asks for a value before it exists."""
    same = same_step(g)
    # find_cycle over the whole graph restarts from every node (superlinear); a cycle lies
    # inside one strongly connected component, so search only a component that has one
    knot = next((c for c in nx.strongly_connected_components(same)
                 if len(c) > 1 or same.has_edge(next(iter(c)), next(iter(c)))), None)  # fmt: skip
    if knot is None:
        return
    cycle = nx.find_cycle(same.subgraph(knot))
    nodes = [u for u, _ in cycle]
    every = next((n for n in nodes if g.nodes[n]["op"] == "every"), None)
    if every is not None:  # x[s] inside x's own recurrence: steps after t do not exist yet
        x = label(g, next(u for u, _ in cycle if _ == every)).rsplit(".", 1)[-1]
        raise RnncError(
            f"reads every step of '{x}' ({x}[s]) in the recurrence that computes '{x}': its later "
            "steps do not exist yet", g.nodes[every]["span"], code="E406",
            hint=f"attend over a sequence computed before this one (an encoder's e[s]), or over "
                 f"what '{x}' is computed from",
        )  # fmt: skip
    named = [n for n in nodes if g.nodes[n]["name"]] or nodes
    text = " -> ".join(short(g, n) for n in named + named[:1])
    first = named[0]
    reader = next(v for u, v in cycle if u == first)
    reader = next((v for u, v in cycle if u in named), reader)
    local = (g.nodes[first]["name"] or "x").rsplit(".", 1)[-1]
    raise RnncError(
        f"algebraic loop: {text} needs its own value at the same step",
        g.nodes[reader]["span"],
        hint=f"did you mean {local}[t-1]?",
        code="E406",
    )


def directions(g: Graph) -> None:
    """Each recurrence must run one way: all its reads from the past, or all from the future."""
    comps = list(nx.strongly_connected_components(g))
    where = {n: i for i, comp in enumerate(comps) for n in comp}
    signs: dict[int, set[bool]] = {}
    for u, v, e in g.edges(data=True):
        if e["delay"] and where[u] == where[v]:
            signs.setdefault(where[u], set()).add(e["delay"] > 0)
    for i, comp in enumerate(comps):
        if len(signs.get(i, ())) == 2:
            n = min(comp)
            names = sorted({g.nodes[m]["name"] for m in comp if g.nodes[m]["name"]})
            raise RnncError(
                f"the recurrence through {', '.join(names) or short(g, n)} reads both earlier "
                "(t-k) and later (t+k) steps, so no order of steps can compute it",
                g.nodes[max(comp)]["span"],
                hint="split it into a forward and a backward recurrence "
                "(bidirectional does this for a cell)",
                code="E407",
            )


def unused(g: Graph) -> list[Warning_]:
    gen_inputs = set(g.graph.get("generate", {}))
    out = []
    for kind in ("inputs", "params", "targets"):
        for name, n in g.graph[kind].items():
            if g.out_degree(n) == 0 and name not in gen_inputs:
                what = kind[:-1]
                out.append(
                    Warning_(
                        f"{what} '{name}' is never used",
                        g.nodes[n]["span"],
                        hint="remove it, or use it in an equation",
                        code="W001",
                    )
                )
    return out


def check(g: Graph) -> Graph:
    """Raise the first error; keep warnings in g.graph['warnings']."""
    algebraic_loops(g)
    directions(g)
    g.graph["warnings"] = unused(g)
    return g


def require_loss(g: Graph) -> int:
    loss = g.graph.get("loss")
    if loss is None:
        span = g.graph.get("model_span") or Span(g.graph["file"])
        raise RnncError(
            f"model '{g.graph['model']}' has no loss",
            Span(span.file, span.line, span.col, span.line, span.col + 5),
            hint="add `loss = cross_entropy(softmax(...), y)` or `loss = mse(prediction, target)`",
            code="E408",
        )
    if g.nodes[loss]["shape"] != () or g.nodes[loss]["level"] != "global":
        raise RnncError(
            "the loss must be one number: use cross_entropy(...) or mse(...), which sum over "
            "time and average over the batch",
            g.nodes[loss]["span"],
            code="E408",
        )
    return loss
