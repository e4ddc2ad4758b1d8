"""Model -> ONNX: the forward pass (inference, full-length sequences) as an ONNX graph.

Steps that run once over a whole sequence become ONNX operators on [T, B, features] tensors;
each time loop becomes a Scan whose body is one step (its states carried, the sequences it
reads scanned, the values read later scanned out; a backward loop scans in reverse). Each op
lowers through its `onnx` rule in the op registry (ops.py). Parameters are initializers;
inputs are [T, B, F] (or [B, F] per sequence) with symbolic T and B. What cannot be exported
is a located error that says why. Needs the `onnx` package (pip install 'rnnc[onnx]')."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from .compiler import Model
from .errors import RnncError, optional
from .graph import init_of, is_seq, label, operands
from .imports import library_text
from .ops import GLOBAL, OPS, needs_feature_axis
from .parse import parse
from .schedule import Loop, Once
from .shapes import describe

OPSET = 18


def require_onnx():
    return optional("onnx", "exporting to ONNX needs the onnx package", "onnx", "E580")


class Builder:
    """Nodes, initializers and names of the graph being built (a Scan body nests one)."""

    def __init__(self, onnx, g):
        self.onnx, self.h, self.g = onnx, onnx.helper, g
        self.nodes: list = []  # the current graph's nodes
        self.inits: list = []  # initializers (all in the main graph; bodies read them by name)
        self.count = 0
        self.shape: tuple[int, ...] = ()
        self.seq_input: str | None = None  # a [T, B, F] graph input, for T and B
        self.levels: list[str] = []  # the operands' levels, for the rule being lowered
        self.in_step = False  # building a Scan's body: per-step values are [B, ...]

    def info(self, name: str, n: int, step: bool = False):
        """A value's type: float, of node n's rank ([T, B, ...] per step, [B, ...] per sequence
        or inside a step, as declared for a parameter), its sizes left open."""
        d = self.g.nodes[n]
        lead = 0 if d["level"] == GLOBAL else 1 if (step or not is_seq(d["level"])) else 2
        return self.h.make_tensor_value_info(name, self.onnx.TensorProto.FLOAT, [None] * (lead + len(d["shape"])))

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def op(self, kind: str, *inputs: str, **attrs: Any) -> str:
        out = self.fresh(kind.lower())
        self.nodes.append(self.h.make_node(kind, list(inputs), [out], **attrs))
        return out

    def tensor(self, value: np.ndarray, base: str = "c") -> str:
        name = self.fresh(base)
        self.inits.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def ints(self, v) -> str:
        return self.tensor(np.asarray(v, np.int64), "i")

    def f(self, v: float) -> str:
        return self.tensor(np.asarray(v, np.float32), "f")

    def fill(self, shape: tuple[int, ...], v: float) -> str:
        return self.tensor(np.full(shape, v, np.float32), "fill")

    def dim(self, axis: int) -> str:
        """T (axis 0) or B (axis 1) of the input sequences, as a 1-element int64 tensor."""
        if self.seq_input is None:
            raise RnncError("the model has no input sequence to take T and B from", code="E581")
        return self.op("Slice", self.op("Shape", self.seq_input), self.ints([axis]), self.ints([axis + 1]))

    def batch_shape(self, shape: tuple[int, ...]) -> str:
        return self.op("Concat", self.dim(1), self.ints(list(shape)), axis=0)

    def zeros(self, shape: tuple[int, ...]) -> str:
        return self.op("ConstantOfShape", self.batch_shape(shape),
                       value=self.onnx.numpy_helper.from_array(np.zeros(1, np.float32)))  # fmt: skip

    def impulse(self, v: str) -> str:
        """[T, B, F]: v at step 0, zeros after (first(v) of a per-sequence v)."""
        rest = self.op("Sub", self.dim(0), self.ints([1]))
        pads = self.op("Concat", self.ints([0, 0, 0]), rest, self.ints([0, 0]), axis=0)
        return self.op("Pad", self.op("Unsqueeze", v, self.ints([0])), pads)

    def pairs(self, h: str) -> str:
        """[T, B, F] -> [T/2, B, 2F]: steps 2t and 2t+1 side by side."""
        F = self.shape[-1] // 2
        split = self.op("Concat", self.ints([-1, 2]), self.dim(1), self.ints([F]), axis=0)
        x = self.op("Reshape", h, split)  # [T/2, 2, B, F]
        return self.op("Reshape", self.op("Transpose", x, perm=[0, 2, 1, 3]), self.ints([0, 0, 2 * F]))

    def at_label(self, z: str, y: str) -> str:
        """z[..., y]: each row's entry at its class label (z and y of one level)."""
        if self.levels[0] != self.levels[1]:
            raise RnncError("a per-sequence score read by per-step labels is not exported", code="E581")
        y = self.op("Unsqueeze", self.op("Cast", y, to=self.onnx.TensorProto.INT64), self.ints([-1]))
        axis = 2 if is_seq(self.levels[0]) and not self.in_step else 1  # (the reference evaluator wants it >= 0)
        return self.op("Squeeze", self.op("GatherElements", z, y, axis=axis), self.ints([-1]))

    def loss_reduce(self, per_step: str, mode: str) -> str:
        """Summed (or averaged) over time, averaged over the batch (full-length sequences)."""
        if is_seq(self.levels[0]) and mode == "sum":
            return self.op("ReduceMean", self.op("ReduceSum", per_step, self.ints([0]), keepdims=0), keepdims=0)
        return self.op("ReduceMean", per_step, keepdims=0)

    def reversed_in_time(self, x: str) -> str:
        return self.op("Slice", x, self.ints([-1]), self.ints([-(2**63)]), self.ints([0]), self.ints([-1]))


# ----- library cells as ONNX's own recurrent operators -----
# ONNX orders the LSTM gates i, o, f, c and the GRU gates z, r, h; PyTorch (and the library)
# i, f, g, o and r, z, n. GRU's reset gate on W_hn h + b_hn is linear_before_reset=1.
# RNNReLU stays a Scan: onnx's reference evaluator knows no Relu activation for RNN.
STOCK = {"LSTM": ("LSTM", [0, 3, 1, 2]), "GRU": ("GRU", [1, 0, 2]), "RNN": ("RNN", [0])}


@dataclass
class Layer:
    """One layer of a library-cell instance exported as one ONNX LSTM/GRU/RNN operator."""

    cell: str
    prefixes: list[str]  # [fwd] or [fwd, bwd]
    outputs: list[int]  # each direction's output node
    inside: set[int]  # the nodes the operator replaces
    source: int  # the node it reads
    direction: str  # forward | reverse | bidirectional


def stock_layers(plan) -> list[Layer]:
    """The layers of library RNN/LSTM/GRU instances that can become ONNX operators: zero
    initial states, nothing inside read from outside but the outputs, one input."""
    g = plan.graph
    loops = plan.loop_of()
    used = {n for st in plan.steps for n in ([st.node] if isinstance(st, Once) else st.nodes)}  # not the adjoints
    by_name = {d["name"]: n for n, d in g.nodes(data=True) if d.get("name")}
    out = []
    library = {c.name: c for c in parse(*library_text()).items}
    for inst, cell in g.graph.get("cells", {}).items():
        if cell not in STOCK or g.graph.get("cell_defs", {}).get(inst) != library.get(cell):
            continue  # only the library's own cell (a cell of the same name may compute otherwise)
        for row in g.graph["instances"][inst]:
            outs = [by_name.get(f"{p}.h") for p in row]
            mine = [by_name.get(f"{p}.{w}") for p in row for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            if None in outs or None in mine or any(o not in loops for o in outs):
                continue
            ups = set().union(*(nx.ancestors(g, o) | {o} for o in outs))
            downs = set().union(*(nx.descendants(g, w) for w in mine))
            inside = ups & downs
            feeds = {u for n in inside for u, _ in operands(g, n) if u not in inside}
            feeds -= set(mine)
            states_ok = all(g.nodes[init_of(g, n)]["op"] == "state_init" for n in inside
                            if init_of(g, n) is not None)  # fmt: skip
            sources = sorted({through_identities(g, u) for u in feeds if g.nodes[u]["op"] not in ("state_init", "const")})
            leaks = any(v in used and v not in inside for n in inside - set(outs) for v in g.successors(n))
            dirs = [plan.steps[loops[o]].direction for o in outs]
            if len(sources) != 1 or leaks or not states_ok or (len(outs) == 2 and dirs != [1, -1]):
                continue
            way = "bidirectional" if len(outs) == 2 else ("forward" if dirs[0] > 0 else "reverse")
            out.append(Layer(cell, row, outs, inside, sources[0], way))
    return out


def through_identities(g, n: int) -> int:
    """The value an identity (a cell's port, say) passes on."""
    while g.nodes[n]["op"] == "identity" and len(operands(g, n)) == 1 and operands(g, n)[0][1] == 0:
        n = operands(g, n)[0][0]
    return n


def emit_layer(b: Builder, layer: Layer, names: dict[int, str], params: dict) -> None:
    """The layer as one ONNX operator; each direction's output [T, B, H] named."""
    kind, order = STOCK[layer.cell]
    H = params[f"{layer.prefixes[0]}.weight_hh"].shape[1]

    def packed(name: str) -> np.ndarray:  # [directions, gates*H, ...] in ONNX's gate order
        return np.stack([np.concatenate([params[f"{p}.{name}"][k * H:(k + 1) * H] for k in order])
                         for p in layer.prefixes]).astype(np.float32)  # fmt: skip

    W, R = b.tensor(packed("weight_ih"), "W"), b.tensor(packed("weight_hh"), "R")
    bias = b.tensor(np.concatenate([packed("bias_ih"), packed("bias_hh")], axis=1), "B")
    attrs: dict[str, Any] = {"hidden_size": int(H), "direction": layer.direction}
    if kind == "GRU":
        attrs["linear_before_reset"] = 1
    if kind == "RNN":
        attrs["activations"] = ["Tanh"] * len(layer.prefixes)
    Y = b.fresh(kind.lower() + "_Y")
    b.nodes.append(b.h.make_node(kind, [names[layer.source], W, R, bias], [Y], **attrs))
    for d, o in enumerate(layer.outputs):  # Y: [T, directions, B, H]
        names[o] = b.op("Squeeze", b.op("Slice", Y, b.ints([d]), b.ints([d + 1]), b.ints([1])), b.ints([1]))


def export(model: Model, params: dict | None = None, stock: bool = True, loss: bool = False) -> Any:
    """The onnx.ModelProto of the model's forward pass (float32), checked by onnx.checker;
    the parameters are `params` (default: the spec's initialization, seed 0). With `stock`,
    layers of the library's RNN, LSTM and GRU become ONNX's own operators. With `loss`, the
    targets are inputs too and the loss an output (full-length sequences)."""
    onnx = require_onnx()
    if loss and "loss" not in model.plans:
        raise RnncError("the model has no loss to export", code="E581")
    plan = model.plans["loss" if loss else "forward"]
    b = Builder(onnx, plan.graph)
    g = plan.graph
    graph_inputs = []
    tables = [("inputs", model.inputs)] + ([("targets", model.targets)] if loss else [])
    for kind, table in tables:
        for name, (shape, dom, labels) in table.items():
            dims = (["T_" + dom.replace("/", "_"), "B"] if dom != "static" else ["B"]) + ([] if labels else list(shape))
            elem = onnx.TensorProto.INT64 if labels else onnx.TensorProto.FLOAT
            graph_inputs.append(onnx.helper.make_tensor_value_info(name, elem, dims))
            if dom != "static" and b.seq_input is None and kind == "inputs":
                b.seq_input = name
    params = model.init_params(0, np.float32) if params is None else params
    layers = stock_layers(plan) if stock else []
    seen: set[int] = set()
    names = Params(b, params)  # a parameter becomes an initializer where something reads it
    for step in plan.steps:
        nodes = [step.node] if isinstance(step, Once) else step.nodes
        layer = next((la for la in layers if set(nodes) & la.inside), None)
        if layer is not None:  # replaced by the layer's operator, written once its loops are passed
            seen |= set(nodes)
            if set(layer.outputs) <= seen and layer.outputs[0] not in names:
                emit_layer(b, layer, names, params)
            continue
        if isinstance(step, Once):
            if g.nodes[step.node]["op"] == "param":
                continue
            names[step.node] = once(b, step.node, names, params)
        else:
            scan(b, step, names, plan)
    outputs = []
    for out, n in plan.wanted.items():
        outputs.append(b.info(out, n))
        b.nodes.append(onnx.helper.make_node("Identity", [names[n]], [out]))
    graph = onnx.helper.make_graph(b.nodes, g.graph["model"], graph_inputs, outputs, initializer=b.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="rnnc")  # fmt: skip
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=False)
    return proto


class Params(dict):
    """Node -> ONNX value name; a parameter's initializer is made on its first read."""

    def __init__(self, b: Builder, params: dict):
        super().__init__()
        self.b, self.params = b, params

    def __missing__(self, n: int) -> str:
        if self.b.g.nodes[n]["op"] != "param":
            raise KeyError(n)
        self[n] = name = leaf(self.b, n, self.params)
        return name


def refuse(g, n: int, why: str) -> RnncError:
    what = label(g, n) if g.nodes[n]["name"] else describe(g, n)  # its source text, not an id
    return RnncError(f"cannot export '{what}' to ONNX: {why}", g.nodes[n]["span"], code="E581")


def leaf(b: Builder, n: int, params: dict) -> str:
    g, d = b.g, b.g.nodes[n]
    op, a = d["op"], d["attrs"]
    if op == "param":
        return b.tensor(np.asarray(params[a["name"]], np.float32), "p")
    if op in ("input", "target"):
        return a["name"]
    if op == "const":
        return b.f(a["value"])
    if op == "state_init":
        return b.zeros(tuple(d["shape"]))
    if op == "mask":  # inference: dropout off, zoneout at its expectation
        return b.f(1.0 if a["kind"] == "dropout" else a["p"])
    raise refuse(g, n, f"a {op} is not part of an exported forward pass")


def lowered(b: Builder, n: int, args: list[str]) -> str:
    """Node n's ONNX value from its operands' names (scalars per step get a feature axis)."""
    g, d = b.g, b.g.nodes[n]
    rule = OPS[d["op"]].onnx
    if d["pair"] or d["op"] in ("sum_s", "softmax_s"):
        raise refuse(g, n, "attention (a read of every step s, x[s]) is not exported to ONNX")
    if rule is None:
        raise refuse(g, n, f"the op '{d['op']}' has no ONNX lowering")
    ins = operands(g, n)
    for i, (u, _) in enumerate(ins):
        du = g.nodes[u]
        if needs_feature_axis(du["shape"], du["level"], d["shape"]):  # as ops.operand_text does
            args[i] = b.op("Unsqueeze", args[i], b.ints([-1]))
    b.shape = tuple(d["shape"])
    b.levels = [g.nodes[u]["level"] for u, _ in ins]
    attrs = {k: v for k, v in d["attrs"].items()}
    return rule(b, *args, **attrs)


def once(b: Builder, n: int, names: dict[int, str], params: dict) -> str:
    g, d = b.g, b.g.nodes[n]
    if OPS[d["op"]].kind == "leaf":
        return leaf(b, n, params)
    args = []
    for u, k in operands(g, n):
        if k != 0:
            raise refuse(g, n, "it reads another step outside a recurrence (x[t-k] of an input)")
        args.append(names[u])
    return lowered(b, n, args)


def scan(b: Builder, loop: Loop, names: dict[int, str], plan) -> None:
    """A time loop as one Scan: states carried (k steps of history for a read at t-k),
    sequences from outside scanned in, the values read after the loop scanned out."""
    onnx, g = b.onnx, b.g
    here = set(loop.nodes)
    depth: dict[int, int] = {}
    for n in loop.nodes:
        for u, k in operands(g, n):
            if u in here and k != 0:
                if k * loop.direction < 0:
                    raise refuse(g, n, "it reads both earlier and later steps in one recurrence")
                depth[u] = max(depth.get(u, 0), abs(k))
    outer_nodes, main_inits = b.nodes, []
    b.nodes, b.in_step = [], True
    body_in, scan_in, scan_in_names = [], [], {}
    history: dict[tuple[int, int], str] = {}
    for s in sorted(depth):
        init = init_of(g, s)
        if init is None or init not in names:
            raise refuse(g, s, "its initial value is not computed before the recurrence")
        for j in range(1, depth[s] + 1):
            history[(s, j)] = nm = b.fresh(f"{label(g, s).replace('.', '_')}_prev{j}")
            body_in.append(b.info(nm, s, step=True))
            main_inits.append(names[init])
    local: dict[int, str] = {}
    for n in loop.nodes:
        d = g.nodes[n]
        if OPS[d["op"]].kind == "leaf":
            raise refuse(g, n, "a leaf inside a recurrence")
        args = []
        for u, k in operands(g, n):
            if u in here:
                args.append(local[u] if k == 0 else history[(u, abs(k))])
            elif is_seq(g.nodes[u]["level"]) and g.nodes[u]["op"] != "mask":  # (a mask is a constant here)
                if k != 0:
                    raise refuse(g, n, "it reads another step of a sequence computed outside the recurrence")
                if u not in scan_in_names:
                    scan_in_names[u] = nm = b.fresh(f"{label(g, u).replace('.', '_')}_t")
                    body_in.append(b.info(nm, u, step=True))
                    scan_in.append(names[u])
                args.append(scan_in_names[u])
            else:
                args.append(names[u])  # per sequence or model-wide: read from the outer scope
        local[n] = lowered(b, n, args)
    outs_state, outs_scan, kept = [], [], []
    for s in sorted(depth):
        chain = [local[s]] + [history[(s, j)] for j in range(1, depth[s])]
        for v in chain:
            nm = b.op("Identity", v)
            outs_state.append(b.info(nm, s, step=True))
    needed_after = [n for n in loop.nodes if n in plan.stored or n in plan.wanted.values()]
    for n in needed_after:
        nm = b.op("Identity", local[n])
        outs_scan.append(b.info(nm, n, step=True))
        kept.append(n)
    body = onnx.helper.make_graph(b.nodes, b.fresh("step"), body_in, outs_state + outs_scan)
    b.nodes, b.in_step = outer_nodes, False
    finals = [b.fresh("final") for _ in outs_state]
    seqs = [b.fresh(f"{label(g, n).replace('.', '_')}_seq") for n in kept]
    if not scan_in:
        raise refuse(g, loop.nodes[0], "a recurrence that reads no sequence has no steps to scan")
    back = loop.direction < 0  # scanned forward over the sequences reversed in time, then back
    scanned = [b.reversed_in_time(x) for x in scan_in] if back else scan_in
    b.nodes.append(onnx.helper.make_node("Scan", main_inits + scanned, finals + seqs, body=body,
                                         num_scan_inputs=len(scan_in)))  # fmt: skip
    for n, nm in zip(kept, seqs, strict=True):
        names[n] = b.reversed_in_time(nm) if back else nm


def random_inputs(model: Model, T: int = 6, B: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=((T, B) if dom != "static" else (B,)) + tuple(shape)).astype(np.float32)
            for name, (shape, dom, _) in model.inputs.items()}  # fmt: skip


def largest_error(model: Model, proto: Any, params: dict | None = None, run=None) -> float:
    """The largest norm-wise relative difference between rnnc's forward pass (float32) and
    `run(proto, inputs)` (default: onnx's ReferenceEvaluator) on a random batch."""
    if run is None:
        from onnx.reference import ReferenceEvaluator

        def run(proto, inputs):
            ev = ReferenceEvaluator(proto)
            return dict(zip(ev.output_names, ev.run(None, inputs), strict=True))

    inputs = random_inputs(model)
    params = model.init_params(0, np.float32) if params is None else params
    want = model.forward({k: np.asarray(v, np.float32) for k, v in params.items()}, inputs)
    got = run(proto, inputs)
    return max(float(np.linalg.norm(got[k] - want[k]) / max(np.linalg.norm(want[k]), 1e-30)) for k in want)


def export_to(model: Model, path: str, params: dict | None = None, loss: bool = False) -> tuple[Any, float]:
    """Export, check the forward pass against rnnc on a random batch (<= 1e-5), write atomically."""
    from .files import atomic_write

    proto = export(model, params, loss=loss)
    try:
        err = largest_error(model, export(model, params) if loss else proto, params)
    except Exception as e:  # the reference evaluator lacks an operator, or refuses the graph
        raise RnncError(f"the exported graph could not be checked by onnx's reference evaluator "
                        f"({type(e).__name__}: {str(e)[:200]})", hint="nothing was written", code="E582") from None  # fmt: skip
    if not err <= 1e-5:
        raise RnncError(f"the exported graph computes something else: outputs differ by {err:.1e}",
                        hint="this is a bug in rnnc's ONNX export", code="E582")  # fmt: skip
    atomic_write(path, proto.SerializeToString())
    return proto, err
