"""Graph, dims -> Graph with every node's `shape` and `level` set: symbolic dims solved,
time domains unified; a mismatch is a located error naming both sides."""

from __future__ import annotations

import math

from . import syntax as S
from .errors import RnncError, Span, UsageError
from .graph import Graph, add_node, init_of, is_seq, label, operands, order, set_init
from .ops import GLOBAL, OPS, STATIC, ShapeError, fmt_shape, pair_of, rank

# ops that cannot take a value per step s: they mix steps t, draw masks, or end in a loss
NOT_PER_S = {"dropout", "zoneout", "sample", "onehot", "batch", "sqerr", "impulse", "first", "last", "pairs"}

MAX_DIM = 10**7  # one dimension
MAX_PARAM = 2**31  # entries of one parameter (8 GiB in float32)


class ClockError(ShapeError):
    """Two sequence inputs' own clocks met: their lengths can differ."""

    def __init__(self, a: str, b: str):
        super().__init__(f"{a} and {b}")
        self.clocks = (a, b)


class Domains:
    """Union-find over time domains: ops that combine sequences must share their steps."""

    def __init__(self, names: list[str] | None = None, clocks: set[str] | None = None):
        self.clocks = clocks or set()  # sequence inputs with steps of their own
        # a domain is named after the first input (then target) declared in it
        self.rank = {name: i for i, name in enumerate(names or [])}
        self.parent: dict[str, str] = {}
        self.halves: dict[str, str] = {}  # root -> the domain pairs() of it makes
        self.base: dict[str, str] = {}  # a halved domain -> what it halves
        self.fresh = 0

    def add(self, d: str) -> str:
        self.parent.setdefault(d, d)
        return d

    def find(self, d: str) -> str:
        while self.parent[d] != d:
            self.parent[d] = self.parent[self.parent[d]]
            d = self.parent[d]
        return d

    def ancestry(self, d: str) -> list[str]:
        """d, then the domain it halves, then that one's, ..."""
        out = [self.find(d)]
        while out[-1] in self.base:
            out.append(self.find(self.base[out[-1]]))
        return out

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra != rb and (ra in self.ancestry(rb) or rb in self.ancestry(ra)):
            raise ShapeError("combines a sequence with pairs() of itself: their lengths differ")
        if ra != rb and ra in self.clocks and rb in self.clocks:
            raise ClockError(ra, rb)
        if ra != rb:
            # keep the root named after an input if one side is
            halved_wins = rb in self.base and ra not in self.base
            named_first = ra not in self.base and rb not in self.base and self.later(ra, rb)
            if ra.startswith("?") or halved_wins or named_first:
                ra, rb = rb, ra
            self.parent[rb] = ra
        return ra

    def later(self, a: str, b: str) -> bool:
        """a was declared after b (an unnamed domain counts as last)."""
        return self.rank.get(a, len(self.rank)) > self.rank.get(b, len(self.rank))

    def new(self) -> str:
        self.fresh += 1
        return self.add(f"?{self.fresh}")

    def halved(self, d: str) -> str:
        r = self.find(d)
        if r not in self.halves:
            h = self.add(f"{r}/2")
            self.halves[r] = h
            self.base[h] = r
        return self.find(self.halves[r])


def eval_dim(d: S.DimExpr | None, env: dict[str, int]) -> int | None:
    match d:
        case S.DNum(v):
            return v
        case S.DName(n):
            return env.get(n)
        case S.DBin(op, a, b):
            x, y = eval_dim(a, env), eval_dim(b, env)
            if x is None or y is None:
                return None
            return x + y if op == "+" else x - y if op == "-" else x * y
    return None


def dim_text(d: S.DimExpr) -> str:
    match d:
        case S.DNum(v):
            return str(v)
        case S.DName(n):
            return n.rsplit(".", 1)[-1]
        case S.DBin(op, a, b):
            return f"{dim_text(a)}{op}{dim_text(b)}"
    return "?"


class ShapeSolver:
    def __init__(self, g: Graph, dims: dict[str, int] | None):
        self.g = g
        self.file = g.graph["file"]
        self.env: dict[str, int] = {}
        clocks = {k for k, n in g.graph["inputs"].items() if g.nodes[n]["attrs"]["dom"] == k}
        self.dom = Domains([*g.graph["inputs"], *g.graph["targets"]], clocks)
        self.bind_dims(dims or {})

    def err(self, msg, span: Span, hint=None, code="E301"):
        return RnncError(msg, span, hint, code)

    # ----- dims -----
    def bind_dims(self, overrides: dict[str, int]) -> None:
        model_dims = self.g.graph["dims"]
        for k in overrides:
            if k not in model_dims:
                raise UsageError(
                    f"--dim {k}: the model has no dimension '{k}'",
                    hint="its dimensions: " + (", ".join(model_dims) or "none"),
                    code="E501",
                )
        for name, (default, span) in model_dims.items():
            if name in overrides:
                self.env[name] = overrides[name]
            elif default is not None:
                v = eval_dim(default, self.env)
                if v is None:
                    raise self.err(f"dimension '{name}' refers to a later dimension", span)
                self.env[name] = v
            else:
                raise self.err(
                    f"dimension '{name}' has no value",
                    span,
                    hint=f"give it a default (dim {name} = 64) or pass --dim {name}=64",
                    code="E302",
                )
            if self.env[name] <= 0:
                raise self.err(f"dimension '{name}' is {self.env[name]}; it must be > 0", span)
            if self.env[name] > MAX_DIM:
                raise self.err(f"dimension '{name}' is {self.env[name]:,}; the limit is "
                               f"{MAX_DIM:,}", span, code="E303")  # fmt: skip
        self.constraints()

    def constraints(self) -> bool:
        changed = False
        for sym, expr, span in self.g.graph["dim_constraints"]:
            v = eval_dim(expr, self.env)
            if v is None:
                continue
            changed |= self.bind(sym, v, span, f"{dim_text(S.DName(sym))} = {dim_text(expr)}")
        return changed

    def bind(self, sym: str, v: int, span: Span, why: str) -> bool:
        if v <= 0 or v > MAX_DIM:
            raise self.err(f"dimension {dim_text(S.DName(sym))} would be {v:,}", span,
                           hint=f"a dimension is a whole number from 1 to {MAX_DIM:,}",
                           code="E303")  # fmt: skip
        old = self.env.get(sym)
        if old is None:
            self.env[sym] = v
            return True
        if old != v:
            raise self.err(
                f"dimension {dim_text(S.DName(sym))} is {old} here but {v} from {why}",
                span,
                code="E303",
            )
        return False

    def declared(self, n: int, shape) -> tuple | None:
        """Match a node against its declared dims, binding those not known yet."""
        d = self.g.nodes[n]
        decl = d.get("declared")
        if decl is None:
            return shape
        vals = [eval_dim(x, self.env) for x in decl]
        if shape is not None:
            if len(shape) != len(decl):
                raise self.declared_error(n, shape)
            for x, v, actual in zip(decl, vals, shape, strict=True):
                if v is None and isinstance(x, S.DName):
                    self.bind(x.name, actual, d["span"], f"the shape of {label(self.g, n)}")
                elif v is not None and v != actual:
                    raise self.declared_error(n, shape)
            return shape
        if all(v is not None for v in vals):
            return tuple(vals)  # type: ignore[arg-type]
        return None

    def declared_error(self, n: int, shape) -> RnncError:
        d = self.g.nodes[n]
        decl = "[" + ", ".join(dim_text(x) for x in d["declared"]) + "]"
        vals = [eval_dim(x, self.env) for x in d["declared"]]
        known = "[" + ", ".join("?" if v is None else str(v) for v in vals) + "]"
        return self.err(
            f"'{label(self.g, n)}' is declared {decl} = {known} but is {fmt_shape(shape)}",
            d["span"],
            hint="the value flowing in has a different size than declared",
            code="E304",
        )

    # ----- levels and time domains -----
    def level_of(self, n: int) -> str | None:
        lv = self.g.nodes[n]["level"]
        if lv is None or not is_seq(lv):
            return lv
        return self.dom.find(lv)

    def noised(self, mask: int) -> int:
        """The value a dropout or zoneout mask applies to: its op's first operand."""
        return operands(self.g, self.g.nodes[mask]["noise_of"])[0][0]

    def infer_level(self, n: int) -> str | None:
        d = self.g.nodes[n]
        op = d["op"]
        if OPS[op].kind == "leaf":
            if op in ("input", "target"):
                lv = d["attrs"]["dom"]
                return self.dom.add(lv) if lv != STATIC else STATIC
            if op == "mask":  # per step of the value it drops, or per sequence
                lv = self.level_of(self.noised(n))
                if lv == GLOBAL:
                    raise self.err(f"{d['attrs']['kind']} of a model-wide value (a param): there is no "
                                   "step or sequence to draw its mask for", d["span"],
                                   hint="drop a value computed from the inputs", code="E411")  # fmt: skip
                return lv if lv is None or d["attrs"]["per"] == "step" else STATIC
            return OPS[op].level(**d["attrs"]) if op != "param" else GLOBAL
        ins = operands(self.g, n)
        levels = [self.level_of(u) for u, _ in ins]
        seqs = [lv for lv in levels if lv is not None and is_seq(lv)]
        if op in ("first", "last"):
            if levels[0] is None:
                return None
            if not is_seq(levels[0]):
                if op == "last":
                    raise self.err(
                        "last() needs a sequence; this value has one entry per sequence",
                        d["span"], code="E403",
                    )  # fmt: skip
                d["op"] = "impulse"  # first(v) of a static v: v enters at the first step
                d["attrs"]["dom"] = self.dom.new()
                return d["attrs"]["dom"]
            d["attrs"]["dom"] = levels[0]
            return STATIC
        if op == "impulse":
            return self.dom.find(d["attrs"]["dom"])
        if op == "every":  # every step s of a sequence: one [S, ...] value per sequence
            return None if levels[0] is None else STATIC
        if op == "pairs":
            if levels[0] is None:
                return None
            if not is_seq(levels[0]):
                raise self.err("pairs() needs a sequence", d["span"], code="E403")
            d["attrs"]["dom"] = self.dom.halved(levels[0])
            return d["attrs"]["dom"]
        if len(seqs) > 1:
            root = seqs[0]
            for s in seqs[1:]:
                try:
                    root = self.dom.union(root, s)
                except ClockError as e:
                    raise self.mixed_clocks(n, *e.clocks) from None
                except ShapeError as e:
                    raise self.err(str(e), d["span"], code="E405") from None
            seqs = [root]
        if op == "loss_reduce":
            if levels[0] is None:
                return None
            d["attrs"]["dom"] = levels[0] if is_seq(levels[0]) else None
            return GLOBAL
        if seqs:
            return seqs[0]
        if any(lv is None for lv in levels):
            return None
        return OPS[op].level(*levels, **d["attrs"])

    def mixed_clocks(self, n: int, a: str, b: str) -> RnncError:
        """A value read on another sequence's clock: the error names it and shows attention."""
        g = self.g
        ins = [u for u, _ in operands(g, n) if is_seq(self.level_of(u) or "")]

        def on(clock: str) -> str:
            u = next((u for u in ins if self.dom.find(self.level_of(u)) == clock), None)
            if u is None:
                return f"the steps of '{clock}'"
            text = g.nodes[u]["name"] or describe(g, u)  # its name, else its source text
            return f"'{text}' (steps of '{clock}')"

        return self.err(
            f"combines {on(a)} with {on(b)}: the two inputs' lengths can differ",
            g.nodes[n]["span"], code="E412",
            hint=("to read every step s of a sequence e from each step of another, write e[s] and "
                  "reduce over s: a = softmax(score, over=s), ctx = sum(a * e[s], over=s); if the two "
                  f"inputs share their steps, declare `input {b} ... : sequence like {a}`"),
        )  # fmt: skip

    # ----- the fixpoint -----
    def run(self) -> Graph:
        g = self.g
        nodes = order(g)
        for _ in range(len(nodes) + 2):
            changed = self.constraints()
            for n in nodes:
                d = g.nodes[n]
                if d["level"] is None or is_seq(d["level"]):
                    lv = self.infer_level(n)
                    if lv is not None and lv != d["level"]:
                        d["level"], changed = lv, True
                if d["shape"] is None:
                    shape = self.infer_shape(n)
                    if shape is not None:
                        d["shape"], changed = shape, True
                else:
                    self.declared(n, d["shape"])
            if not changed:
                break
        self.finish()
        return g

    def infer_shape(self, n: int):
        d = self.g.nodes[n]
        op = OPS[d["op"]]
        if op.kind == "leaf":
            if d["op"] == "state_init":
                return None  # takes the shape of its state (set in finish)
            if d["op"] == "mask":  # shaped like the value it drops
                return self.g.nodes[self.noised(n)]["shape"]
            if "like" in d:  # a learned initial state: the shape of its state
                return self.g.nodes[d["like"]]["shape"]
            if d["op"] == "const":
                if "dimconst" in d:  # a dimension read as a number
                    value = eval_dim(d["dimconst"], self.env)
                    if value is None:
                        return None
                    d["attrs"]["value"] = float(value)
                return ()
            return self.declared(n, None)
        ins = operands(self.g, n)
        shapes = [self.g.nodes[u]["shape"] for u, _ in ins]
        if "dimattrs" in d:
            if shapes[0] is None:
                return None
            a, b = d["dimattrs"]
            start = 0 if a is None else eval_dim(a, self.env)
            stop = shapes[0][-1] if b is None else eval_dim(b, self.env)
            if start is None or stop is None:
                return None
            d["attrs"]["start"], d["attrs"]["stop"] = start, stop
        try:
            shape = op.shape(*shapes, **d["attrs"])
        except ShapeError as e:
            raise self.shape_error(n, str(e)) from None
        return self.declared(n, shape) if shape is not None else self.declared(n, None)

    def shape_error(self, n: int, msg: str) -> RnncError:
        g = self.g
        parts = []
        for u, _ in operands(g, n):
            du = g.nodes[u]
            where = du["span"]
            what = du["name"] or describe(g, u)
            parts.append(f"{what} is {fmt_shape(du['shape'])} ({where.file}:{where.line})")
        return self.err(
            f"{g.nodes[n]['op']}: {msg}",
            g.nodes[n]["span"],
            hint="; ".join(parts) if parts else None,
            code="E301",
        )

    def finish(self) -> None:
        g = self.g
        for n in order(g):
            d = g.nodes[n]
            init = init_of(g, n)
            if init is not None and g.nodes[init]["op"] == "state_init":
                g.nodes[init]["shape"] = d["shape"]
        for n, d in g.nodes(data=True):
            if d["level"] is None or (
                is_seq(d["level"]) and self.dom.find(d["level"]).startswith("?")
            ):
                [e["delay"] for _, _, e in g.out_edges(n, data=True) if e["delay"]]
                raise self.err(
                    f"cannot tell how many steps '{named(g, n)}' runs for",
                    d["span"],
                    hint="a recurrence needs an input sequence (declared `: sequence`) among its "
                    "operands to set its length",
                    code="E404",
                )  # fmt: skip
            if d["shape"] is None:
                raise self.err(
                    f"cannot infer the shape of '{describe(g, n) if d['span'].line else named(g, n)}'",
                    d["span"],
                    hint="declare the dimensions it depends on, or pass them as cell arguments",
                    code="E305",
                )
        # canonical domain names, then a strict pass: every rule sees every shape
        for _, d in g.nodes(data=True):
            if is_seq(d["level"]):
                d["level"] = self.dom.find(d["level"])
            if "dom" in d["attrs"] and d["attrs"]["dom"] not in (None, STATIC) and d["op"] not in (
                "input", "target"):  # fmt: skip
                d["attrs"]["dom"] = self.dom.find(d["attrs"]["dom"])
            if d["op"] in ("input", "target") and is_seq(d["level"]):
                d["attrs"]["dom"] = d["level"]
            if d["op"] == "onehot":
                d["attrs"]["n"] = d["shape"][-1]
        for name, n in g.graph["params"].items():
            size = math.prod(g.nodes[n]["shape"])
            if size > MAX_PARAM:
                raise self.err(f"param {name} {fmt_shape(g.nodes[n]['shape'])} has {size:,} "
                               f"entries; the limit is {MAX_PARAM:,}", g.nodes[n]["span"],
                               hint="smaller dimensions (--dim)", code="E303")  # fmt: skip
        for n in list(g.nodes):
            init = init_of(g, n)
            if init is not None and g.nodes[init]["level"] == GLOBAL and is_seq(g.nodes[n]["level"]):
                # a param as the initial state (init=h0): the same start for every sequence
                b = add_node(g, "batch", [(init, 0)], None, g.nodes[init]["span"])
                g.nodes[b].update(shape=g.nodes[init]["shape"], level=STATIC)
                set_init(g, n, b)
        self.pairs()
        for n in g.nodes:
            self.check_node(n)
        g.graph["domains"] = self.domain_table()
        g.graph["env"] = dict(self.env)

    def pairs(self) -> None:
        """Which values hold every step s of another sequence (attention), each in order: x[s]
        starts one, a reduction over=s ends it; such a value is never a state or a loss."""
        g = self.g
        for n in order(g):
            d = g.nodes[n]
            ins = operands(g, n)
            pairs = [g.nodes[u]["pair"] for u, _ in ins]
            if d["op"] == "every":
                lv = g.nodes[ins[0][0]]["level"]
                if not is_seq(lv):
                    per = "for the whole model" if lv == GLOBAL else "per sequence"
                    raise self.err(f"'{label(g, ins[0][0])}' has one value {per}: there are no steps s "
                                   "to read", d["span"], hint="x[s] reads every step of a sequence", code="E403")  # fmt: skip
                if pairs[0] is not None:
                    raise self.err("reads every step s of a value that already holds every step s",
                                   d["span"], hint="reduce it over=s first", code="E412")  # fmt: skip
                d["attrs"]["over"] = lv
            elif d["op"] in ("softmax_s", "sum_s"):
                if pairs[0] is None:
                    raise self.err(f"{'softmax' if d['op'] == 'softmax_s' else 'sum'}(..., over=s) of a value "
                                   "that reads no x[s]: there are no steps s to reduce over", d["span"],
                                   hint="a = softmax(score, over=s) where score reads e[s]", code="E412")  # fmt: skip
                d["attrs"]["over"] = pairs[0]
                d["attrs"]["causal"] = pairs[0] == d["level"]
            elif any(p is not None for p in pairs) and (
                OPS[d["op"]].kind != "pointwise" or d["op"] in NOT_PER_S or OPS[d["op"]].labels
            ):
                raise self.err(f"{describe(g, n)} of a value per step s of '{next(p for p in pairs if p)}'",
                               d["span"], hint="reduce it over s first: sum(..., over=s)", code="E412")  # fmt: skip
            try:
                d["pair"] = pair_of(OPS[d["op"]], pairs, d["attrs"], d["level"])
            except ShapeError as e:
                raise self.err(str(e), d["span"], code="E412") from None
        for u, v, e in g.edges(data=True):
            if g.nodes[u]["pair"] is not None and e["delay"] != 0:
                raise self.err(f"'{label(g, u)}' holds a value per step s of '{g.nodes[u]['pair']}': it "
                               "cannot be read at another step t", g.nodes[v]["span"],
                               hint="read what it reduces to: ctx = sum(a * e[s], over=s), then ctx[t-1]", code="E412")  # fmt: skip

    def check_node(self, n: int) -> None:
        g, d = self.g, self.g.nodes[n]
        op = OPS[d["op"]]
        ins = operands(g, n)
        if op.kind != "leaf":
            try:
                shape = op.shape(*(g.nodes[u]["shape"] for u, _ in ins), **d["attrs"])
            except ShapeError as e:
                raise self.shape_error(n, str(e)) from None
            if shape != d["shape"]:
                raise self.shape_error(n, f"{fmt_shape(shape)} vs {fmt_shape(d['shape'])}")
            seqs = {g.nodes[u]["level"] for u, _ in ins if is_seq(g.nodes[u]["level"])}
            if len(seqs) > 1 and d["op"] not in ("pairs",):
                raise self.err(
                    f"{d['op']} combines sequences of different lengths ({', '.join(sorted(seqs))})",
                    d["span"],
                    hint="use last(...) or final(...) to pass one sequence's end to another",
                    code="E405",
                )
        for u, k in ins:
            du = g.nodes[u]
            if du["classes"] and not OPS[d["op"]].labels and d["op"] != "onehot":
                raise self.err(
                    f"'{label(g, u)}' holds class labels, not numbers",
                    d["span"],
                    hint=f"use onehot({label(g, u)}) to turn labels into vectors",
                    code="E306",
                )
            if k != 0 and not is_seq(du["level"]):
                raise self.err(
                    f"'{label(g, u)}' is read at a time offset but is not a sequence",
                    d["span"],
                    hint="only values that change from step to step can be read at t-k",
                    code="E401",
                )
        if OPS[d["op"]].labels and not g.nodes[ins[1][0]]["classes"]:
            raise self.err(
                "cross_entropy needs class labels as its target",
                d["span"],
                hint="declare the target `: sequence of class(K)`; for real values use mse",
                code="E306",
            )
        init = init_of(g, n)
        if init is not None:
            di = g.nodes[init]
            if di["shape"] != d["shape"]:
                raise self.err(
                    f"the initial value of '{named(g, n)}' is {value_text(di)}; the state is "
                    f"{value_text(d)}",
                    di["span"],
                    code="E402",
                )
            if rank(di["level"]) > rank(STATIC):
                raise self.err(
                    f"the initial value of '{named(g, n)}' is a sequence",
                    di["span"],
                    hint="use final(e) or last(e) to start from one value per sequence",
                    code="E402",
                )

    def domain_table(self) -> dict[str, dict]:
        """For each time domain: the inputs and targets that carry its length, or what it halves."""
        table: dict[str, dict] = {}
        for _n, d in self.g.nodes(data=True):
            lv = d["level"]
            if is_seq(lv):
                entry = table.setdefault(lv, {"inputs": [], "halves": self.dom.base.get(lv)})
                if d["op"] in ("input", "target"):
                    entry["inputs"].append(d["attrs"]["name"])
        for entry in table.values():
            if entry["halves"] is not None:
                entry["halves"] = self.dom.find(entry["halves"])
        return table


def named(g: Graph, n: int) -> str:
    """n's spec name, or that of the equation it is part of."""
    seen = {n}
    frontier = [n]
    while frontier:
        m = frontier.pop(0)
        if g.nodes[m]["name"]:
            return g.nodes[m]["name"]
        for _, v, e in g.out_edges(m, data=True):
            if v not in seen and e["delay"] == 0:
                seen.add(v)
                frontier.append(v)
    return label(g, n)


def describe(g: Graph, n: int) -> str:
    d = g.nodes[n]
    src = g.graph.get("source", "")
    sp = d["span"]
    lines = src.splitlines()
    if sp.line and sp.line == sp.end_line and sp.line <= len(lines):
        return lines[sp.line - 1][sp.col - 1 : sp.end_col - 1]
    return named(g, n)  # never an internal op's name


def value_text(d: dict) -> str:
    """A value's shape and how often it changes, in words: 'one number per sequence'."""
    shape = "one number" if d["shape"] == () else f"a {fmt_shape(d['shape'])} vector"
    if len(d["shape"] or ()) == 2:
        shape = f"a {fmt_shape(d['shape'])} matrix"
    per = {GLOBAL: "for the whole model", STATIC: "per sequence"}.get(d["level"], "per step")
    return f"{shape} {per}"


def infer_shapes(g: Graph, dims: dict[str, int] | None = None) -> Graph:
    """Every node's shape and level, or a located error."""
    return ShapeSolver(g, dims).run()
