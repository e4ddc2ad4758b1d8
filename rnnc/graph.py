"""The graph IR over networkx, and helpers: add_op, operands, Sym handles, pretty, validate.

A model is one networkx.MultiDiGraph.
Node attributes:
  op      the op's name in ops.OPS ("tanh", "matmul", "param", ...)
  attrs   dict of the op's attributes (param name, slice bounds, loss mode, ...)
  shape   tuple of feature sizes, () for a scalar; None until shapes.py sets it
  level   GLOBAL (no batch axis: params, losses), STATIC (one per sequence) or the name of
          a time domain (one per step); None until shapes.py sets it
  name    the spec variable this node defines, qualified by cell instance ("h1.fwd.c"), or None
  span    errors.Span of the source it came from
  classes True when the value is a class index (targets of class(K), sample) not a vector
  pair    the domain whose every step s the value holds (attention: arrays [S, B, ...] per
          step or sequence), or None
Edge attributes:
  pos     operand position (0, 1, ...), or "init" for the edge from a state's initial value
  delay   0 = same step; k > 0 reads step t-k; k < 0 reads step t+|k|
Graph attributes (g.graph): model, file, source, params, inputs, targets, outputs, loss,
  states, domains, dims, instances (see elaborate.py).
"""

from __future__ import annotations

import functools
from typing import Any

import networkx as nx

from .errors import NOWHERE, RnncError, Span
from .ops import GLOBAL, OPS, STATIC, ShapeError, fmt_shape, pair_of
from .parse import read_source

Graph = nx.MultiDiGraph


def new_graph(**attrs: Any) -> Graph:
    g = nx.MultiDiGraph()
    g.graph.update(attrs)
    g.graph.setdefault("next_id", 0)
    return g


def add_node(g: Graph, op: str, operands=(), var=None, span: Span = NOWHERE, **attrs) -> int:
    """Add a node without shape inference (elaborate.py; shapes.py fills shapes later).

    `var` is the spec variable the node defines (its `name` attribute)."""
    n = g.graph["next_id"]
    g.graph["next_id"] = n + 1
    g.add_node(n, op=op, attrs=attrs, shape=None, level=None, name=var, span=span,
               classes=OPS[op].int_out, pair=None)  # fmt: skip
    for pos, (src, delay) in enumerate(operands):
        g.add_edge(src, n, pos=pos, delay=delay)
    return n


def add_op(g: Graph, op: str, operands=(), var=None, span: Span = NOWHERE, **attrs) -> int:
    """Add a node to a shaped graph: its shape and level follow at once from the op's rules."""
    n = add_node(g, op, operands, var, span, **attrs)
    node = g.nodes[n]
    ins = [g.nodes[u] for u, _ in operands]
    try:
        node["shape"] = OPS[op].shape(*(i["shape"] for i in ins), **attrs)
    except ShapeError as e:
        raise RnncError(str(e), span, code="E301") from None
    node["level"] = OPS[op].level(*(i["level"] for i in ins), **attrs)
    try:
        node["pair"] = pair_of(OPS[op], [i.get("pair") for i in ins], attrs, node["level"])
    except ShapeError as e:
        raise RnncError(str(e), span, code="E412") from None
    return n


def operands(g: Graph, n: int) -> list[tuple[int, int]]:
    """(source, delay) of each operand of n, in operand order."""
    # the adjacency dicts directly: the optimizer asks this ~10^4 times per compile, and
    # networkx's views cost several times the lookup itself
    ins = [
        (d["pos"], u, d["delay"])
        for u, keyed in g._pred[n].items()
        for d in keyed.values()
        if d["pos"] != "init"
    ]
    ins.sort()
    return [(u, k) for _, u, k in ins]


def init_of(g: Graph, n: int) -> int | None:
    """The node holding n's initial value (read where t-k falls before the start), if any."""
    for u, keyed in g._pred[n].items():
        for d in keyed.values():
            if d["pos"] == "init":
                return u
    return None


def set_init(g: Graph, n: int, init: int) -> None:
    for u, _, key, d in list(g.in_edges(n, keys=True, data=True)):
        if d["pos"] == "init":
            g.remove_edge(u, n, key)
    g.add_edge(init, n, pos="init", delay=0)


def is_seq(level: str | None) -> bool:
    return level not in (GLOBAL, STATIC, None)


class Sym:
    """A handle on a node as read at some delay; its operators add nodes (VJPs read as math)."""

    __slots__ = ("delay", "g", "node")

    def __init__(self, g: Graph, node: int, delay: int = 0):
        self.g, self.node, self.delay = g, node, delay

    @property
    def shape(self) -> tuple[int, ...]:
        return self.g.nodes[self.node]["shape"]

    @property
    def level(self) -> str:
        return self.g.nodes[self.node]["level"]

    def op(self, name: str, *others: Sym | float, **attrs) -> Sym:
        args = [self, *(self._lift(o) for o in others)]
        return Sym(self.g, add_op(self.g, name, [(a.node, a.delay) for a in args], **attrs))

    def _lift(self, x: Sym | float) -> Sym:
        if isinstance(x, Sym):
            return x
        return Sym(self.g, add_op(self.g, "const", value=float(x)))

    def __add__(self, o):
        return self.op("add", o)

    def __radd__(self, o):
        return self._lift(o).op("add", self)

    def __sub__(self, o):
        return self.op("sub", o)

    def __rsub__(self, o):
        return self._lift(o).op("sub", self)

    def __mul__(self, o):
        return self.op("mul", o)

    def __rmul__(self, o):
        return self._lift(o).op("mul", self)

    def __truediv__(self, o):
        return self.op("div", o)

    def __neg__(self):
        return self.op("neg")


def label(g: Graph, n: int) -> str:
    """How a node is shown in printouts: its spec name, else a short id."""
    name = g.nodes[n]["name"]
    return name if name else f"%{n}"


def ref(g: Graph, n: int, delay: int) -> str:
    s = label(g, n)
    return s if delay == 0 else f"{s}[t-{delay}]" if delay > 0 else f"{s}[t+{-delay}]"


def pretty_node(g: Graph, n: int) -> str:
    d = g.nodes[n]
    args = [ref(g, u, k) for u, k in operands(g, n)]
    attrs = {k: v for k, v in d["attrs"].items() if k not in ("dom",)}
    if attrs:
        args += [f"{k}={v!r}" for k, v in attrs.items()]
    init = init_of(g, n)
    lhs = label(g, n) + (f" (from {label(g, init)})" if init is not None else "")
    where = f"  {d['span'].file}:{d['span'].line}" if d["span"].line else ""
    lvl = d["level"] or "?"
    return f"{lhs} = {d['op']}({', '.join(args)})  {fmt_shape(d['shape'])} {lvl}{where}"


def pretty(g: Graph) -> str:
    """One line per node in dependency order, delays as h[t-1] (like JAX's pp_jaxpr)."""
    return "\n".join(pretty_node(g, n) for n in order(g))


def order(g: Graph) -> list[int]:
    """A topological order of the same-step dataflow (delayed edges are not dependencies)."""
    same_step = nx.MultiDiGraph()
    same_step.add_nodes_from(g.nodes)
    same_step.add_edges_from((u, v) for u, v, d in g.edges(data=True) if d["delay"] == 0)
    try:
        return list(nx.lexicographical_topological_sort(same_step))
    except nx.NetworkXUnfeasible:
        return sorted(g.nodes)


def upstream(g: Graph, nodes) -> set[int]:
    """`nodes` and everything they depend on, by any edge (one walk for all of them)."""
    seen = set(nodes)
    stack = list(seen)
    while stack:
        for u in g.pred[stack.pop()]:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def validate(g: Graph) -> None:
    """Internal invariants (run after every pass when RNNC_CHECKS=1): a bug, not a user error."""
    for n, d in g.nodes(data=True):
        op = OPS.get(d["op"])
        assert op is not None, f"node {n}: unknown op {d['op']!r}"
        ops_ = operands(g, n)
        poss = sorted(e["pos"] for _, _, e in g.in_edges(n, data=True) if e["pos"] != "init")
        assert poss == list(range(len(poss))), f"node {n}: operand positions {poss}"
        assert op.arity is None or op.arity == len(ops_), f"node {n} ({d['op']}): arity {len(ops_)}"
        if d["shape"] is not None:
            assert isinstance(d["shape"], tuple), f"node {n}: shape {d['shape']!r}"
            shapes = [g.nodes[u]["shape"] for u, _ in ops_]
            if op.kind != "leaf" and None not in shapes:  # the op's own rule still holds
                try:
                    want = op.shape(*shapes, **d["attrs"])
                except ShapeError as e:
                    raise AssertionError(f"node {n} ({d['op']}): {e}") from None
                assert want in (None, d["shape"]), f"node {n} ({d['op']}): {d['shape']} != {want}"
    same = nx.DiGraph((u, v) for u, v, e in g.edges(data=True) if e["delay"] == 0)
    assert nx.is_directed_acyclic_graph(same), "a same-step cycle (algebraic loop)"
    where = {n: i for i, comp in enumerate(nx.strongly_connected_components(g)) for n in comp}
    signs: dict[int, set[bool]] = {}
    for u, v, e in g.edges(data=True):
        if e["delay"] and where[u] == where[v]:
            signs.setdefault(where[u], set()).add(e["delay"] > 0)
    assert all(len(s) == 1 for s in signs.values()), "a recurrence reads past and future"


def copy_graph(g: Graph) -> Graph:
    """A copy whose node attr dicts (and their `attrs`) can be changed without touching g."""
    h = g.copy()
    for _, d in h.nodes(data=True):
        d["attrs"] = dict(d["attrs"])
    h.graph = {k: (dict(v) if isinstance(v, dict) else v) for k, v in g.graph.items()}
    return h


def forward_outputs(g: Graph) -> dict[str, int]:
    """Named outputs that need no targets."""
    targets = set(g.graph["targets"].values())
    return {k: n for k, n in g.graph["outputs"].items() if not (nx.ancestors(g, n) | {n}) & targets}


def source_line(g: Graph, span: Span) -> str | None:
    """The text of the line a node came from, its comment dropped: from the spec, or from the
    file of the cell it is in (the library's, or a user's `use ... from` file)."""
    if not span.line:
        return None
    if span.file == g.graph.get("file"):
        lines = tuple(g.graph.get("source", "").splitlines())
    else:
        lines = file_lines(span.file)
    return lines[span.line - 1].split("#")[0].strip() if span.line <= len(lines) else None


@functools.cache
def file_lines(path: str) -> tuple[str, ...]:
    try:
        return tuple(read_source(path).splitlines())
    except (OSError, UnicodeDecodeError):  # gone since it was compiled: no quote, no error
        return ()
