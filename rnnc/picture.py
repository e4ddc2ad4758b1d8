"""Graph or DAG -> DOT text: cells as clusters, recurrent edges dashed and labelled with
their delay, unrolled steps laid out left to right like the textbook figures."""

from __future__ import annotations

import itertools
import shutil
import subprocess

import networkx as nx

from .errors import RnncError
from .graph import Graph, operands
from .ops import fmt_shape

STYLE = {
    "param": 'shape=box, style="rounded,filled", fillcolor="#f3e9d2", color="#b08d57"',
    "input": 'shape=invhouse, style=filled, fillcolor="#d7ecd9", color="#4c8c57"',
    "target": 'shape=house, style=filled, fillcolor="#fde2e1", color="#b5524c"',
    "named": 'shape=ellipse, style=filled, fillcolor="#dbe8f6", color="#3c6e9f", penwidth=1.6',
    "op": 'shape=ellipse, fontsize=10, color="#888888", fontcolor="#444444"',
    "loss": 'shape=doubleoctagon, style=filled, fillcolor="#fbd9a6", color="#c07a12"',
}


LINK = "#2e6fb7"  # one sequence's final state starting another's recurrence
BUNDLE = "#7d3c98"  # attention: every step s of a sequence, read by each step t


def quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def node_style(g: Graph, n: int) -> str:
    d = g.nodes[n]
    if n == g.graph.get("loss"):
        return STYLE["loss"]
    if d["op"] in ("param", "input", "target"):
        return STYLE[d["op"]]
    return STYLE["named"] if d["name"] else STYLE["op"]


# attention's ops, in words
OP_WORDS = {"every": "every step s", "sum_s": "Σ over s", "softmax_s": "softmax over s"}


def node_label(g: Graph, n: int) -> str:
    d = g.nodes[n]
    if d["name"]:
        short = d["name"].rsplit(".", 1)[-1] if d.get("scope") else d["name"]
        what = d["op"] if d["op"] not in ("identity",) else ""
        extra = f"\n{what}" if what and d["op"] not in ("param", "input", "target") else ""
        return f"{short}\n{fmt_shape(d['shape'])}{extra}"
    return OP_WORDS.get(d["op"], d["op"])


def to_dot(g: Graph) -> str:
    """The rolled graph: one node per op, cell instances as clusters, delays on dashed edges."""
    lines = [f"digraph {quote(g.graph['model'])} {{", "  rankdir=TB; newrank=true;",
             '  node [fontname="Helvetica"]; edge [fontname="Helvetica", fontsize=10];']  # fmt: skip
    clusters: dict[str, list[int]] = {}
    for n, d in g.nodes(data=True):
        if d["op"] in ("const", "state_init"):
            continue
        clusters.setdefault(d.get("scope") or "", []).append(n)
    for i, (scope, nodes) in enumerate(sorted(clusters.items())):
        indent = "  "
        if scope:
            lines.append(f"  subgraph cluster_{i} {{")
            lines.append(f'    label={quote(scope)}; style="rounded,dashed"; color="#7a7a7a";')
            indent = "    "
        for n in nodes:
            lines.append(f"{indent}n{n} [label={quote(node_label(g, n))}, {node_style(g, n)}];")
        if scope:
            lines.append("  }")
    for u, v, e in g.edges(data=True):
        if g.nodes[u]["op"] in ("const", "state_init"):
            continue
        if e["pos"] == "init":  # a state starting from another's value: the encoder's final state
            lines.append(f'  n{u} -> n{v} [style=bold, color="{LINK}", fontcolor="{LINK}", label="init", '
                         "constraint=false];")  # fmt: skip
            continue
        k = e["delay"]
        if k:
            tag = f"t-{k}" if k > 0 else f"t+{-k}"
            lines.append(f'  n{u} -> n{v} [style=dashed, color="#c0392b", fontcolor="#c0392b", '
                         f'label="{tag}", constraint=false];')  # fmt: skip
        else:
            lines.append(f"  n{u} -> n{v};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def port_copy(dag: Graph, n: int) -> bool:
    """A cell's input port bound straight to a model input: the same value, drawn once."""
    d = dag.nodes[n]
    ins = operands(dag, n)
    return d["op"] == "identity" and len(ins) == 1 and dag.nodes[ins[0][0]]["op"] == "input"


def variables_view(dag: Graph) -> nx.DiGraph:
    """The unrolled DAG reduced to named variables (and inputs, targets, the loss):
    an edge where one depends on the other through unnamed nodes only."""
    keep = {
        n for n, d in dag.nodes(data=True)
        if (d["name"] and d["op"] not in ("param", "state_init", "const") and not port_copy(dag, n))
        or n == dag.graph.get("loss") or d["op"] == "stack"  # attention's e[s]: one bundle
    }  # fmt: skip
    same: dict[tuple, int] = {}  # e[s] read twice (scores and context): one bundle
    for n in sorted(n for n in keep if dag.nodes[n]["op"] == "stack"):
        first = same.setdefault(tuple(u for u, _ in operands(dag, n)), n)
        if first != n:
            keep.discard(n)
    alias = {n: same[tuple(u for u, _ in operands(dag, n))] for n, d in dag.nodes(data=True) if d["op"] == "stack"}
    view = nx.DiGraph()
    view.add_nodes_from(keep)
    for v in keep:
        stack, seen = [u for u, _ in operands(dag, v)], set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            u = alias.get(u, u)
            if u in keep:
                view.add_edge(u, v)
            elif dag.nodes[u]["op"] == "pick_last":  # final(e): drawn from e's last step
                stack.append(operands(dag, u)[-1][0])
            else:
                stack.extend(w for w, _ in operands(dag, u))
    return view


def column(dag: Graph, n: int) -> tuple[str, int] | None:
    """The (time domain, step) a node of the unrolled DAG belongs to, or None."""
    d = dag.nodes[n]
    t = d.get("orig", (None, None))[1]
    if t is None:
        t = d["attrs"].get("t")
    return None if t is None else (d.get("dom") or "", t)


def unrolled_dot(dag: Graph) -> str:
    """Steps as columns, left to right; each variable a row, inputs at the bottom; the edges
    that carry a state from one step to the next drawn in red (the textbook figure)."""
    view = variables_view(dag)
    lines = [f"digraph {quote(dag.graph['model'] + ' unrolled')} {{", "  rankdir=BT; newrank=true; nodesep=0.35;",
             '  node [fontname="Helvetica"]; edge [fontname="Helvetica", color="#555555"];']  # fmt: skip
    cols = {n: column(dag, n) for n in view.nodes}
    # each time domain in columns of its own, left to right in the order the model computes them
    doms = list(dict.fromkeys(c[0] for n, c in sorted(cols.items()) if c is not None))
    key = {c: (doms.index(c[0]), c[1]) for c in cols.values() if c is not None}
    ids = {c: f"step{i}_{c[1]}" for c, (i, _) in key.items()}
    rows: dict[str, list[tuple[tuple[int, int], int]]] = {}
    for n in view.nodes:
        d = dag.nodes[n]
        label_ = "loss" if n == dag.graph.get("loss") else d["name"]
        style = STYLE["loss"] if n == dag.graph.get("loss") else STYLE.get(d["op"], STYLE["named"])
        if d["op"] == "stack":  # every step s of a sequence, gathered once for attention
            label_ = f"{(dag.nodes[operands(dag, n)[0][0]]['name'] or '').rsplit('.', 1)[-1]}[s]"
            style = f'shape=box, style="rounded,bold", color="{BUNDLE}", fontcolor="{BUNDLE}"'
        lines.append(f"  n{n} [label={quote(label_)}, {style}];")
        c = cols[n]
        rows.setdefault(label_, []).append((key[c] if c is not None else (-1, -1), n))
    steps = sorted(key, key=key.get)
    for c in steps:  # a header row naming the steps (and their domain, where there are two)
        text = f"{c[0]}: t = {c[1]}" if len(doms) > 1 else f"t = {c[1]}"
        lines.append(f'  {ids[c]} [label="{text}", shape=plaintext, fontcolor="#777777"];')
    if steps:
        lines.append("  { rank=same; " + " ".join(f"{ids[c]};" for c in steps) + " }")
        lines += [f"  {ids[a]} -> {ids[b]} [style=invis];" for a, b in itertools.pairwise(steps)]
    for members in rows.values():
        members.sort()
        if len(members) > 1:
            lines.append("  { rank=same; " + " ".join(f"n{n};" for _, n in members) + " }")
            lines += [
                f"  n{a} -> n{b} [style=invis];" for (_, a), (_, b) in itertools.pairwise(members)
            ]
    # one row per variable, stacked in dataflow order; a step's nodes share a column
    order = sorted(rows.values(), key=lambda ms: min(n for _, n in ms))
    below = {key[c]: ids[c] for c in steps}
    for members in order:
        for k, n in members:
            if k in below:
                lines.append(f"  {below[k]} -> n{n} [style=invis, weight=10];")
                below[k] = f"n{n}"
    for u, v in view.edges:
        cu, cv = cols[u], cols[v]
        if dag.nodes[u]["op"] == "stack":  # the bundle into each step that attends
            style = f' [color="{BUNDLE}", penwidth=2.2, constraint=false]'
        elif dag.nodes[v]["op"] == "stack":
            style = f' [color="{BUNDLE}", style=dotted, arrowhead=none]'
        elif cu is not None and cv is not None and cu[0] != cv[0]:  # one sequence into another
            style = f' [color="{LINK}", penwidth=1.8, label="init", fontcolor="{LINK}", constraint=false]'
        elif cu is not None and cv is not None and cu != cv:
            style = ' [color="#c0392b", penwidth=1.6, constraint=false]'
        else:
            style = ""
        lines.append(f"  n{u} -> n{v}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_file(dot: str, path: str) -> None:
    """Write DOT, or SVG/PNG through Graphviz's `dot` (a clear error when it is missing)."""
    from .files import atomic_write

    fmt = path.rsplit(".", 1)[-1].lower() if "." in path else "dot"
    if fmt in ("dot", "gv"):
        atomic_write(path, dot.encode())
        return
    if fmt not in ("svg", "png", "pdf"):
        raise RnncError(
            f"cannot draw to '.{fmt}'", hint="use .dot, .svg, .png or .pdf", code="E503"
        )
    exe = shutil.which("dot")
    if exe is None:
        raise RnncError(
            f"drawing {fmt.upper()} needs Graphviz's `dot` program, which is not installed",
            hint="install Graphviz (Debian: apt-get install graphviz), or write .dot instead",
            code="E504",
        )
    out = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True, check=False)
    if out.returncode != 0:
        raise RnncError(f"dot failed: {out.stderr.decode(errors='replace').strip()}", code="E504")
    atomic_write(path, out.stdout)
