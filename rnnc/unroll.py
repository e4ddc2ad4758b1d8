"""Graph, T -> DAG: the time-unrolled graph, in the same IR with every edge at delay 0.

This is the reference semantics. A read of u at t-k becomes an edge from u's copy at step
t-k; outside 0..T-1 it reads u's initial value (or, when `carried`, the state carried in
from a previous window). With `masked`, a read counts only where both steps lie inside the
sequence's own length. Whole-sequence ops become their per-step forms (loss_step,
pick_last, concat for pairs), so grad() applies to the DAG unchanged: grad and unroll commute.
"""

from __future__ import annotations

from .graph import Graph, add_node, init_of, is_seq, new_graph, operands, order
from .ops import GLOBAL, STATIC

MAX_UNROLLED = 200_000  # nodes; larger DAGs are refused, not half-built


def unroll(g: Graph, T: dict[str, int], masked: bool = False, carried: bool = False) -> Graph:
    from .errors import RnncError

    steps = {dom: T[dom] for dom in g.graph["domains"]}
    size = sum(steps.get(d["level"], 1) for _, d in g.nodes(data=True))
    if size > MAX_UNROLLED:
        raise RnncError(
            f"unrolling makes {size} nodes; the limit is {MAX_UNROLLED}", code="E409",
            hint="unroll fewer steps",
        )  # fmt: skip
    dag = new_graph(
        model=g.graph["model"], file=g.graph["file"], source=g.graph.get("source", ""),
        unrolled=True, T=steps, domains=g.graph["domains"], params={}, inputs={}, targets={}, masks={},
        outputs={}, loss=None, states={},
    )  # fmt: skip
    copies: dict[tuple[int, int | None], int] = {}
    nodes = order(g)

    def copy_steps(n: int) -> list[int | None]:
        lv = g.nodes[n]["level"]
        return list(range(steps[lv])) if is_seq(lv) else [None]

    for n in nodes:
        d = g.nodes[n]
        for t in copy_steps(n):
            c = add_node(dag, "identity", (), d["name"], d["span"])
            dag.nodes[c].update(shape=d["shape"], level=STATIC if t is not None else d["level"],
                                classes=d["classes"], pair=d["pair"], orig=(n, t),
                                dom=d["level"] if t is not None else None)  # fmt: skip
            copies[(n, t)] = c
    carries: dict[tuple[int, int], int] = {}

    def extra(op: str, ins: list[int], like: int, level=STATIC, **attrs) -> int:
        x = add_node(dag, op, [(i, 0) for i in ins], None, g.nodes[like]["span"], **attrs)
        dag.nodes[x].update(shape=g.nodes[like]["shape"], level=level)
        return x

    def fill(u: int, s: int) -> int:
        if carried and s < 0:
            if (u, s) not in carries:
                name = g.nodes[u]["name"] or f"%{u}"
                carries[(u, s)] = extra("carry", [], u, state=name, s=s)
            return carries[(u, s)]
        return copies[(init_of(g, u), None)]  # type: ignore[index]

    def read(u: int, t: int | None, k: int) -> int:
        lv = g.nodes[u]["level"]
        if not is_seq(lv):
            return copies[(u, None)]
        assert t is not None
        s = t - k
        if k == 0:
            return copies[(u, t)]
        if not 0 <= s < steps[lv]:
            return fill(u, s)
        if masked:
            return extra("select_valid", [copies[(u, s)], fill(u, s)], u, t=t, s=s, dom=lv)
        return copies[(u, s)]

    def per_step(n: int, t: int | None) -> tuple[str, dict, list[int]]:
        """The op, attrs and operands of n's copy at step t."""
        d = g.nodes[n]
        op, attrs, ins = d["op"], dict(d["attrs"]), operands(g, n)
        if op in ("input", "target", "mask") and t is not None:
            return op, {**attrs, "t": t}, []
        if op == "loss_reduce" and is_seq(g.nodes[ins[0][0]]["level"]):
            u = ins[0][0]
            lv = g.nodes[u]["level"]
            parts = [
                extra("loss_step", [copies[(u, s)]], n, GLOBAL, t=s, mode=attrs["mode"], dom=lv)
                for s in range(steps[lv])
            ]
            return "sum", {}, parts
        if op == "last":
            u = ins[0][0]
            return "pick_last", attrs, [copies[(u, s)] for s in range(steps[g.nodes[u]["level"]])]
        if op == "first":
            return "identity", {}, [copies[(ins[0][0], 0)]]
        if op == "impulse":
            if t == 0 and not carried:
                return "identity", {}, [read(ins[0][0], None, 0)]
            return "zeros", {"shape": d["shape"]}, []
        if op == "every":  # every step s, stacked: [S, B, ...]
            u = ins[0][0]
            return "stack", attrs, [copies[(u, s)] for s in range(steps[g.nodes[u]["level"]])]
        if op in ("softmax_s", "sum_s", "bcast_s") and attrs.get("causal"):
            attrs["t"] = t  # s <= t
        if op == "pairs":
            u = ins[0][0]
            assert t is not None
            return "concat", {"axis": -1}, [copies[(u, 2 * t)], copies[(u, 2 * t + 1)]]
        return op, attrs, [read(u, t, k) for u, k in ins]

    for n in nodes:
        for t in copy_steps(n):
            op, attrs, args = per_step(n, t)
            c = copies[(n, t)]
            dag.nodes[c]["op"], dag.nodes[c]["attrs"] = op, attrs
            for pos, a in enumerate(args):
                dag.add_edge(a, c, pos=pos, delay=0)
    for kind in ("params", "inputs", "targets", "masks"):
        for name, n in g.graph.get(kind, {}).items():
            if n not in g:  # a mask whose value no output reads (dead code)
                continue
            dag.graph[kind][name] = [copies[(n, t)] for t in copy_steps(n)]
    for name, n in g.graph["outputs"].items():
        dag.graph["outputs"][name] = [copies[(n, t)] for t in copy_steps(n)]
    for n in nodes:
        if g.nodes[n]["op"] == "state_init":
            dag.graph["states"][g.nodes[n]["attrs"]["state"]] = copies[(n, None)]
    if g.graph.get("loss") is not None:
        dag.graph["loss"] = copies[(g.graph["loss"], None)]
    return dag
