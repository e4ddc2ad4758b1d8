"""DAG -> values: evaluates the unrolled graph node by node in NumPy (float64 by default).

The oracle the compiled code is checked against: one op at a time, no scheduling, no loops.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np

from . import kernels
from .graph import Graph, is_seq, operands
from .ops import OPS, operand_text, render


def mask_names(domains: dict[str, dict]) -> dict[str, str]:
    return {d: "M_" + "".join(c if c.isalnum() else "_" for c in d) for d in domains}


def step_masks(domains: dict, T: dict[str, int], lengths: dict[str, np.ndarray] | None):
    """[T, B] bool masks per domain (None where all steps are valid); halved domains follow."""
    masks: dict[str, Any] = {}
    for dom in sorted(domains, key=lambda d: d.count("/")):
        base = domains[dom]["halves"]
        if base is not None:
            masks[dom] = kernels.pairs_mask(masks[base])
        elif lengths is not None and dom in lengths:
            L = np.asarray(lengths[dom])
            masks[dom] = np.arange(T[dom])[:, None] < L[None, :]
        else:
            masks[dom] = None
    return masks


def context(g: Graph, n: int, t: Any = None) -> dict[str, Any]:
    """The names a template's {M}, {T}, {t}, {B}, {dt}, {rng}, {n} stand for at node n."""
    d = g.nodes[n]
    dom = d["attrs"].get("dom")
    if dom is None:
        levels = [g.nodes[u]["level"] for u, _ in operands(g, n)] + [d["level"]]
        dom = next((lv for lv in levels if is_seq(lv)), None)
    tag = "".join(c if c.isalnum() else "_" for c in dom) if dom else ""
    over = d["attrs"].get("over")
    return {
        "Mo": "M_" + "".join(c if c.isalnum() else "_" for c in over) if over else "None",
        "To": "T_" + "".join(c if c.isalnum() else "_" for c in over) if over else "None",
        "r": len(d["shape"] or ()),
        "M": f"M_{tag}" if dom else "None",
        "T": f"T_{tag}" if dom else "None",
        "t": d["attrs"].get("t", t),
        "B": "B",
        "dt": "dt",
        "rng": "rng",
        "n": d["shape"][-1] if d["shape"] else 1,
        "carried": "carry is not None",
        "window": "window",  # a window of a longer sequence (checkpointing): its losses' weights
    }


_compiled: dict[str, Any] = {}


def interpret(
    dag: Graph,
    params: dict[str, np.ndarray],
    inputs: dict[str, np.ndarray],
    targets: dict[str, np.ndarray] | None = None,
    lengths: dict[str, np.ndarray] | None = None,
    carry: dict[str, np.ndarray] | None = None,
    state_init: dict[str, np.ndarray] | None = None,
    dtype=np.float64,
) -> dict[int, np.ndarray]:
    """The value of every node of an unrolled DAG."""
    targets, carry, state_init = targets or {}, carry or {}, state_init or {}
    T = dag.graph["T"]
    first_seq = next(
        (v for k, v in {**inputs, **targets}.items() if is_seq(level_of(dag, k))), None
    )
    B = first_seq.shape[1] if first_seq is not None else next(iter(inputs.values())).shape[0]
    masks = step_masks(dag.graph["domains"], T, lengths)
    ns: dict[str, Any] = {k: getattr(kernels, k) for k in dir(kernels) if not k.startswith("_")}
    ns.update(np=np, B=B, dt=dtype, rng=np.random.default_rng(0), window=None)
    for dom, name in mask_names(dag.graph["domains"]).items():
        ns[name] = masks[dom]
        ns["T_" + name[2:]] = T[dom]
    values: dict[int, np.ndarray] = {}
    for n in nx.topological_sort(dag):
        d = dag.nodes[n]
        op, a = d["op"], d["attrs"]
        if op == "param":
            values[n] = np.asarray(params[a["name"]], dtype)
        elif op in ("input", "target"):
            src = inputs if op == "input" else targets
            v = np.asarray(src[a["name"]])
            v = v[a["t"]] if "t" in a else v
            values[n] = v if d["classes"] else v.astype(dtype)
        elif op == "mask":  # given in inputs, else evaluation's: no dropout, zoneout's expectation
            v = inputs.get(a["name"])
            if v is None:
                values[n] = np.full((B, *d["shape"]), 1.0 if a["kind"] == "dropout" else a["p"], dtype)
            else:
                values[n] = np.asarray(v)[a["t"]].astype(dtype) if "t" in a else np.asarray(v, dtype)
        elif op == "state_init":
            v = state_init.get(a["state"])
            values[n] = np.zeros((B, *d["shape"]), dtype) if v is None else np.asarray(v, dtype)
        elif op == "carry":
            values[n] = np.asarray(carry[a["state"]][a["s"]], dtype)
        else:
            ins = operands(dag, n)
            args = [
                operand_text(f"a{i}", dag.nodes[u]["shape"], dag.nodes[u]["level"], d["shape"])
                for i, (u, _) in enumerate(ins)
            ]
            text = render(OPS[op], args, a, context(dag, n))
            code = _compiled.get(text)
            if code is None:
                code = _compiled[text] = compile(text, "<op>", "eval")
            local = {f"a{i}": values[u] for i, (u, _) in enumerate(ins)}
            values[n] = eval(code, ns, local)
    return values


def level_of(dag: Graph, name: str) -> str:
    for kind in ("inputs", "targets"):
        if name in dag.graph[kind]:
            ids = dag.graph[kind][name]
            n = ids[0]
            return "seq" if "t" in dag.nodes[n]["attrs"] else dag.nodes[n]["level"]
    return "global"


def outputs(dag: Graph, values: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Each named output: stacked to [T, B, ...] if per step, else as is."""
    out = {}
    for name, ids in dag.graph["outputs"].items():
        vs = [values[i] for i in ids]
        seq = (
            "t" in dag.nodes[ids[0]]["attrs"]
            or len(ids) > 1
            or dag.nodes[ids[0]].get("orig", (0, None))[1] is not None
        )
        out[name] = np.stack(vs) if seq else vs[0]
    return out
