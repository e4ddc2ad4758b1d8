"""Graph, loss -> Graph with adjoints: reverse mode over the op registry's VJPs.

Works on the rolled graph and on the unrolled DAG alike. The adjoint of an edge read at
delay k is an edge at delay -k (JAX: the transpose of a scan is a reversed scan), so BPTT is
itself a recurrence running the other way; the steps whose read fell before the start send
their adjoint to the state's initial value (edge_sum).
"""

from __future__ import annotations

import networkx as nx

from .errors import RnncError
from .graph import Graph, Sym, add_node, add_op, copy_graph, init_of, operands
from .ops import OPS, STATIC, rank

LEAVES = ("param", "input", "state_init")


def differentiable_leaves(g: Graph) -> list[int]:
    return [n for n, d in g.nodes(data=True) if d["op"] in LEAVES and not d["classes"]]


def unbroadcast(ct: Sym, like: int) -> Sym:
    """Sum a cotangent down to the shape and level of the operand it belongs to."""
    g = ct.g
    d = g.nodes[like]
    if d["shape"] == () and ct.shape != ():
        ct = ct.op("sum_f")
    pair = g.nodes[ct.node]["pair"]
    if pair is not None and d["pair"] is None:  # read at every step s: Σ over s
        ct = ct.op("sum_s", over=pair)
    if rank(ct.level) > rank(d["level"]):
        keep = len(d["shape"]) + (1 if d["level"] == STATIC else 0) + (1 if d["pair"] else 0)
        ct = ct.op("reduce_to", keep=keep, level=d["level"])
    return ct


def grad(g: Graph, loss: int | None = None) -> Graph:
    """A copy of g with an adjoint node d<name> for every node between the leaves and the loss.

    g.graph['grads'] maps each param, real input and initial state to its adjoint node."""
    g = copy_graph(g)
    loss = g.graph["loss"] if loss is None else loss
    leaves = differentiable_leaves(g)
    reach = set(leaves).union(*(nx.descendants(g, n) for n in leaves))
    relevant = (nx.ancestors(g, loss) | {loss}) & reach
    adj: dict[int, list[tuple[int, int]]] = {n: [] for n in relevant}
    dnode: dict[int, int] = {}
    for n in sorted(relevant):  # every adjoint first exists as an empty n-ary sum
        d = g.nodes[n]
        dn = add_node(g, "sum", (), "d" + d["name"] if d["name"] else None, d["span"])
        g.nodes[dn].update(shape=d["shape"], level=d["level"], pair=d["pair"], adjoint_of=n, adjoint=True)
        dnode[n] = dn
    adj[loss].append((add_op(g, "const", value=1.0), 0))
    for v in sorted(relevant):
        d = g.nodes[v]
        if d["op"] in LEAVES:
            continue
        rule = OPS[d["op"]].vjp
        ins = operands(g, v)
        if rule is None:
            raise RnncError(f"no VJP for '{d['op']}'", d["span"], code="E900")
        first_new = g.graph["next_id"]
        cts = rule(Sym(g, dnode[v]), Sym(g, v), *(Sym(g, u, k) for u, k in ins), **d["attrs"])
        for (u, k), ct in zip(ins, cts, strict=True):
            if ct is None or u not in relevant:
                continue
            ct = unbroadcast(ct, u)
            adj[u].append((ct.node, -k))
            init = init_of(g, u)
            if k != 0 and init is not None and init in relevant:
                es = ct.op("edge_sum", k=k, dom=g.nodes[u]["level"], state=g.nodes[u]["name"])
                adj[init].append((unbroadcast(es, init).node, 0))  # a param h0: Σ over batch
        for m in range(first_new, g.graph["next_id"]):  # the rule's nodes come from v's equation
            g.nodes[m]["span"], g.nodes[m]["adjoint_of"] = d["span"], v
    for n, dn in dnode.items():
        contributions = adj[n] or [(add_op(g, "zeros_like", [(n, 0)]), 0)]
        for pos, (c, k) in enumerate(contributions):
            g.add_edge(c, dn, pos=pos, delay=k)
    g.graph["grads"] = grads_table(g, dnode)
    g.graph["adjoints"] = dnode
    return g


def grads_table(g: Graph, dnode: dict[int, int]) -> dict[str, int | list[int]]:
    """Leaf name -> adjoint node (a list of per-step nodes for an unrolled input)."""
    out: dict[str, int | list[int]] = {}
    for kind in ("params", "inputs"):
        for name, n in g.graph[kind].items():
            ids = n if isinstance(n, list) else [n]
            if not ids or not all(i in dnode for i in ids):
                continue
            per_step = isinstance(n, list) and kind == "inputs" and "t" in g.nodes[ids[0]]["attrs"]
            out[name] = [dnode[i] for i in ids] if per_step else dnode[ids[0]]
    for n, d in g.nodes(data=True):
        if d["op"] == "state_init" and n in dnode:
            out[d["name"]] = dnode[n]
    return out
