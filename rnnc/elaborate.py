"""Program -> Graph: one model's equations, with cells instantiated, directions, stacking,
time functions and losses expanded into one networkx graph (graph.py documents it)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from . import syntax as S
from .errors import RnncError, Span
from .graph import Graph, add_node, new_graph, operands, set_init
from .imports import with_imports
from .ops import BY_SPELLING, LOSSES, NOISE, STATIC

MERGES = ("concat", "sum", "mul", "avg")
INITS = ("zeros", "constant", "uniform", "normal", "glorot", "xavier", "orthogonal")
Ref = tuple  # (node, delay) or ("pending", name, delay, scope)


@dataclass
class DirInstance:
    """One direction of one layer of a cell instance: its prefix and output node."""

    prefix: str
    cell: S.Cell
    reversed: bool
    scope: Scope
    output: Ref | None = None


@dataclass
class Instance:
    name: str
    layers: list[list[DirInstance]]
    merge: str
    span: Span


@dataclass
class Scope:
    prefix: str  # "" for the model, "h1.fwd" inside an instance
    decls: dict[str, tuple[str, object]]  # name -> (kind, declaration or node)
    dims: dict[str, str]  # local dim name -> qualified dim symbol
    flip: int = 1  # -1 inside a reversed instance: t-k reads become t+k
    roots: dict[str, int] = field(default_factory=dict)

    def qualify(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name


class Elaborator:
    def __init__(self, program: S.Program, model: S.Model):
        self.program, self.model = program, model
        self.file = program.file
        self.cells = {c.name: c for c in program.items if isinstance(c, S.Cell)}
        self.g = new_graph(
            model=model.name, file=program.file, source=program.source, params={}, inputs={},
            targets={}, outputs={}, loss=None, dims={}, dim_constraints=[], instances={},
            generate={}, domains={}, masks={},
        )  # fmt: skip
        self.pending: list[tuple[int, int, str, int, Scope, Span]] = []
        self.deferred_inits: list[tuple[DirInstance, S.Expr, Scope, Span]] = []
        self.masks: dict[str, int] = self.g.graph["masks"]  # dropout and zoneout masks by name
        self.equation = ""  # the equation being elaborated
        self.instances: dict[str, Instance] = {}
        self.used_prefixes: set[str] = set()
        self.prefix = ""  # the cell instance being elaborated (pictures draw it as a cluster)
        self.calling: list[str] = []  # the cells being instantiated, outermost first

    # ----- nodes -----
    def mk(self, op: str, args: list[Ref], span: Span, name=None, **attrs) -> int:
        """A node whose operands may still be pending (equations not yet built)."""
        n = add_node(self.g, op, (), name, span, **attrs)
        self.g.nodes[n]["scope"] = self.prefix
        for pos, a in enumerate(args):
            if a[0] == "pending":
                _, ref_name, delay, scope = a
                self.pending.append((n, pos, ref_name, delay, scope, span))
            else:
                self.g.add_edge(a[0], n, pos=pos, delay=a[1])
        return n

    def error(self, msg: str, span: Span, hint: str | None = None, code: str = "E200"):
        return RnncError(msg, span, hint, code)

    # ----- declarations -----
    def declare(self, scope: Scope, name: str, kind: str, what, span: Span) -> None:
        if name == "t":
            raise self.error("'t' is the time index and cannot be defined", span, code="E203")
        if name in scope.decls:
            _prev_kind, prev = scope.decls[name]
            where = getattr(prev, "span", None)
            raise self.error(
                f"'{name}' is defined twice",
                span,
                hint=f"first defined at {where}" if where and where.line else None,
                code="E202",
            )
        scope.decls[name] = (kind, what)

    def model_scope(self) -> Scope:
        scope = Scope("", {}, {})
        for stmt in self.model.body:
            match stmt:
                case S.DimDecl(items):
                    for it in items:
                        self.declare(scope, it.name, "dim", it, it.span)
                        scope.dims[it.name] = it.name
                        self.g.graph["dims"][it.name] = (it.default, it.span)
                case S.InputDecl(name, _, _, span):
                    self.declare(scope, name, "input", stmt, span)
                case S.TargetDecl(name, _, _, _, span):
                    self.declare(scope, name, "target", stmt, span)
                case S.ParamDecl(items):
                    for it in items:
                        self.declare(scope, it.name, "param", it, it.span)
                case S.Equation(name, _, gen, span) if gen:
                    if name in self.g.graph["generate"]:
                        raise self.error(f"'{name}' has two generate rules", span, code="E202")
                    self.g.graph["generate"][name] = stmt
                case S.Equation(name, _, _, span):
                    self.declare(scope, name, "eq", stmt, span)
        for name, (kind, d) in scope.decls.items():
            if kind == "input" and d.like is not None:
                other = scope.decls.get(d.like, ("", None))
                if other[0] != "input" or other[1].kind != "sequence" or other[1].like is not None:
                    raise self.error(f"'{name}' is declared like '{d.like}', which is not an input sequence "
                                     "of its own clock", d.span,
                                     hint="write `input q[I] : sequence like x`, x a sequence input", code="E205")  # fmt: skip
        for name, rule in self.g.graph["generate"].items():
            if scope.decls.get(name, ("", None))[0] != "input":
                raise self.error(
                    f"generate rule for '{name}', which is not an input",
                    rule.span,
                    hint="a generate rule says how to make an input from earlier outputs",
                    code="E204",
                )
        for name, (kind, d) in scope.decls.items():
            if kind in ("input", "target", "param"):
                scope.decls[name] = (kind, self.leaf(kind, d, scope))
        return scope

    def leaf(self, kind: str, d, scope: Scope) -> int:
        if kind == "param":
            self.check_init(d.init)
            name = scope.qualify(d.name)
            n = add_node(self.g, "param", (), name, d.span, name=name)  # attrs name: params key
            self.g.nodes[n]["declared"] = self.qdims(d.dims, scope)
            self.g.nodes[n]["init"] = d.init
            self.g.nodes[n]["scope"] = scope.prefix
            self.g.graph["params"][name] = n
            return n
        level = (getattr(d, "like", None) or d.name) if d.kind == "sequence" else STATIC
        n = add_node(self.g, kind, (), d.name, d.span, name=d.name, dom=level)
        self.g.graph["domains"][d.name] = d.kind
        if kind == "target" and d.classes is not None:
            self.g.nodes[n]["classes"] = True
            self.g.nodes[n]["declared"] = (self.qdim(d.classes, scope),)
        else:
            self.g.nodes[n]["declared"] = self.qdims(d.dims, scope)
        self.g.graph[kind + "s"][d.name] = n
        return n

    def check_init(self, init: S.Init | None) -> None:
        if init is None:
            return
        if init.kind in INITS:
            self.check_init_args(init)
            return
        close = difflib.get_close_matches(init.kind, INITS, 1)
        raise self.error(
            f"unknown initializer '{init.kind}'",
            init.span,
            hint=f"did you mean '{close[0]}'?" if close else "one of: " + ", ".join(INITS),
            code="E205",
        )

    def check_init_args(self, init: S.Init) -> None:
        """The arguments each initializer takes, and the values that make sense."""
        k, a = init.kind, init.args
        usage = {"constant": "constant(0.5) or = 0.5", "uniform": "uniform(-0.1, 0.1)",
                 "normal": "normal(0, 0.01)"}.get(k, k)  # fmt: skip
        counts = {"constant": (1,), "uniform": (0, 1, 2), "normal": (0, 1, 2)}.get(k, (0,))
        problem = None
        if len(a) not in counts:
            want = " or ".join(map(str, counts))
            problem = f"'{k}' takes {want} argument{'s' * (counts != (1,))}, got {len(a)}"
        elif k == "uniform" and len(a) == 2 and not a[0] < a[1]:
            problem = f"uniform({a[0]:g}, {a[1]:g}): the low end must be below the high end"
        elif k == "uniform" and len(a) == 1 and not a[0] > 0:
            problem = f"uniform({a[0]:g}): the half-width must be above 0"
        elif k == "normal" and len(a) >= 1 and a[-1] < 0:
            problem = f"normal(...): the standard deviation {a[-1]:g} is negative"
        if problem:
            raise self.error(problem, init.span, hint=f"write {usage}", code="E205")

    def qdim(self, d: S.DimExpr, scope: Scope) -> S.DimExpr:
        match d:
            case S.DName(n, span):
                if n not in scope.dims:
                    known = [k for k, (kind, _) in scope.decls.items() if kind == "dim"]
                    close = difflib.get_close_matches(n, known, 1)
                    raise self.error(
                        f"unknown dimension '{n}'",
                        span,
                        hint=f"did you mean '{close[0]}'?"
                        if close
                        else f"declare it: dim {n} = ...",
                        code="E206",
                    )
                return S.DName(scope.dims[n], span)
            case S.DBin(op, a, b, span):
                return S.DBin(op, self.qdim(a, scope), self.qdim(b, scope), span)
        return d

    def qdims(self, dims, scope: Scope) -> tuple:
        return tuple(self.qdim(d, scope) for d in dims)

    # ----- equations -----
    def build_equations(self, scope: Scope) -> None:
        for name, (kind, eq) in list(scope.decls.items()):
            if kind != "eq":
                continue
            outer, self.equation = self.equation, name  # dropout/zoneout inside it are named after it
            ref = self.expr(eq.expr, scope, eq_name=name)
            self.equation = outer
            root = self.mk("identity", [ref], eq.span, name=scope.qualify(name))
            scope.roots[name] = root

    def expr(self, e: S.Expr, scope: Scope, eq_name: str = "") -> Ref:
        match e:
            case S.Num(v, span):
                return (self.mk("const", [], span, value=v), 0)
            case S.Name(n, span):
                return self.lookup(n, 0, scope, span)
            case S.TimeRef(n, k, span):
                return self.lookup(n, k * scope.flip, scope, span, timed=True)
            case S.Every(n, span):
                return (self.mk("every", [self.lookup(n, 0, scope, span, timed=True)], span, over=None), 0)
            case S.Slice(x, a, b, span):
                n = self.mk("slice", [self.expr(x, scope)], span, start=0, stop=0, axis=-1)
                self.g.nodes[n]["dimattrs"] = (
                    self.qdim(a, scope) if a is not None else None,
                    self.qdim(b, scope) if b is not None else None,
                )
                return (n, 0)
            case S.Neg(x, span):
                return (self.mk("neg", [self.expr(x, scope)], span), 0)
            case S.BinOp(op, a, b, span):
                name = {"+": "add", "-": "sub", "*": "mul", "/": "div", "@": "matmul"}[op]
                return (self.mk(name, [self.expr(a, scope), self.expr(b, scope)], span), 0)
            case S.Call():
                return self.call(e, scope, eq_name)
        raise TypeError(e)

    def visible(self, scope: Scope) -> list[str]:
        return [k for k, (kind, _) in scope.decls.items() if kind != "dim"]

    def lookup(self, n: str, delay: int, scope: Scope, span: Span, timed=False) -> Ref:
        if n not in scope.decls:
            if n in self.cells:
                raise self.error(
                    f"'{n}' is a cell; call it", span, hint=f"write {n}(x, ...)", code="E201"
                )
            close = difflib.get_close_matches(n, self.visible(scope), 1)
            hint = f"did you mean '{close[0]}'?" if close else None
            if n == "t":
                hint = "t is only meaningful inside brackets: x[t-1]"
            raise self.error(f"'{n}' is not defined", span, hint=hint, code="E201")
        kind, what = scope.decls[n]
        if kind == "dim":  # a dimension read as a number (1 / H): its value, once shapes know it
            if timed:
                raise self.error(f"'{n}' is a dimension: it has no time steps to read", span,
                                 hint=f"write {n} for its value", code="E207")  # fmt: skip
            node = self.mk("const", [], span, value=0.0)
            self.g.nodes[node]["dimconst"] = self.qdim(S.DName(n, span), scope)
            return (node, 0)
        if timed and delay != 0 and kind in ("param",):
            raise self.error(
                f"'{n}' is a parameter: it has no time steps to read",
                span,
                hint="only sequences (inputs and equations) can be read at t-k",
                code="E401",
            )
        if kind == "eq":
            return ("pending", n, delay, scope)
        static = self.g.nodes[what]["attrs"].get("dom") == STATIC
        if kind in ("input", "target") and static and timed and delay != 0:
            raise self.error(
                f"'{n}' is static (one value per sequence): it has no time steps",
                span,
                hint="declare it `: sequence` to read it at t-k",
                code="E401",
            )
        return (what, delay)

    def kw_number(self, fn: str, key: str, v: S.Expr) -> float:
        match v:
            case S.Num(x):
                return x
            case S.Neg(S.Num(x)):
                return -x
        raise self.error(f"{fn}: '{key}' must be a number", v.span, code="E208")

    def call(self, e: S.Call, scope: Scope, eq_name: str) -> Ref:
        fn, span = e.fn, e.span
        if fn in self.cells:
            return self.instantiate(e, scope, eq_name)
        if e.mods:
            raise self.error(
                f"'{e.mods[0].kind}' applies to a cell, and '{fn}' is not one",
                e.mods[0].span,
                hint="define the recurrence as a cell: cell Name(x[I]) -> h[H] { ... }",
                code="E209",
            )
        if fn in LOSSES:
            return self.loss(e, scope)
        if fn == "final":
            return self.final(e, scope)
        if fn in NOISE:
            return self.noise(e, scope)
        op = BY_SPELLING.get(fn)
        if op is None:
            names = list(BY_SPELLING) + list(LOSSES) + list(self.cells)
            close = difflib.get_close_matches(fn, names, 1)
            raise self.error(
                f"unknown function '{fn}'",
                span,
                hint=f"did you mean '{close[0]}'?" if close else None,
                code="E210",
            )
        attrs = dict(op.attrs)
        over = [v for key, v in e.kwargs if key == "over"]
        if over:
            return self.over_s(e, over[0], scope)
        for key, v in e.kwargs:
            if key not in op.attrs:
                raise self.error(f"{fn} takes no argument '{key}'", v.span, code="E208")
            attrs[key] = self.kw_number(fn, key, v)
        if op.arity is not None and len(e.args) != op.arity:
            raise self.error(
                f"{fn} takes {op.arity} argument{'s' * (op.arity != 1)}, got {len(e.args)}",
                span,
                code="E208",
            )
        if op.arity is None and not e.args:
            raise self.error(f"{fn} needs at least one argument", span, code="E208")
        args = [self.expr(a, scope) for a in e.args]
        if fn in ("pairs", "first", "last"):
            return (self.mk(fn, args, span, dom=None), 0)
        if fn == "onehot":
            attrs["n"] = 0
        return (self.mk(op.name, args, span, **attrs), 0)

    def over_s(self, e: S.Call, over: S.Expr, scope: Scope) -> Ref:
        """softmax(x, over=s) and sum(x, over=s): a reduction over the steps s of what x reads
        at x[s] (attention weights, a context vector)."""
        usage = "a = softmax(score, over=s), ctx = sum(a * e[s], over=s)"
        if e.fn not in ("softmax", "sum"):
            raise self.error(f"{e.fn} takes no argument 'over'", over.span,
                             hint=f"only softmax and sum reduce over the steps s: {usage}", code="E208")  # fmt: skip
        if not isinstance(over, S.Name) or over.name != "s":
            raise self.error("over= names the steps to reduce: over=s", over.span, hint=usage, code="E208")
        extra = [k for k, _ in e.kwargs if k != "over"]
        if extra or len(e.args) != 1:
            at = next((v.span for k, v in e.kwargs if k != "over"), e.span)
            what = f"no argument '{extra[0]}'" if extra else f"1 argument, got {len(e.args)}"
            raise self.error(f"{e.fn}(..., over=s) takes {what}", at, hint=usage, code="E208")
        op = "softmax_s" if e.fn == "softmax" else "sum_s"
        return (self.mk(op, [self.expr(e.args[0], scope)], e.span, over=None, causal=False), 0)

    def noise(self, e: S.Call, scope: Scope) -> Ref:
        """dropout(x, p[, per=sequence]) and zoneout(h, p): the op over a mask leaf named
        `<equation>.<op>` (e.g. h.c.zoneout), which a user may also pass in `inputs`."""
        fn, span = e.fn, e.span
        usage = "dropout(x, 0.2), dropout(x, 0.2, per=sequence)" if fn == "dropout" else "h = zoneout(o * tanh(c), 0.1)"
        if len(e.args) != 2:
            raise self.error(f"{fn} takes 2 arguments (a value and p), got {len(e.args)}", span,
                             hint=f"write {usage}", code="E208")  # fmt: skip
        p = self.kw_number(fn, "p", e.args[1])
        if not 0 <= p < 1:
            raise self.error(f"{fn}: p = {p:g} is outside [0, 1)", e.args[1].span,
                             hint="p is the probability of dropping (dropout) or keeping (zoneout) a unit", code="E208")  # fmt: skip
        per = "step"
        for key, v in e.kwargs:
            if fn == "dropout" and key == "per" and isinstance(v, S.Name) and v.name in ("step", "sequence"):
                per = v.name
            elif fn == "dropout" and key == "per":
                raise self.error(f"dropout: per={v.name if isinstance(v, S.Name) else '...'} is neither step "
                                 "nor sequence", v.span, hint=f"write {usage}", code="E208")  # fmt: skip
            else:
                raise self.error(f"{fn} takes no argument '{key}'", v.span, hint=f"write {usage}", code="E208")
        eq_name = self.equation  # at any depth of the equation, not only its top call
        if fn == "zoneout" and not eq_name:
            raise self.error("zoneout keeps the previous value of the equation it is in; here there is none",
                             span, hint=f"write {usage}", code="E208")  # fmt: skip
        base = f"{scope.qualify(eq_name) if eq_name else 'init'}.{fn}"
        name = base if base not in self.masks else f"{base}{sum(k.startswith(base) for k in self.masks) + 1}"
        mask = add_node(self.g, "mask", (), name, span, name=name, kind=fn, p=p, per=per)
        self.g.nodes[mask]["scope"] = self.prefix
        args = [self.expr(e.args[0], scope)]
        if fn == "zoneout":
            # the previous step in the direction the recurrence runs (t+1 in a backward one)
            back = any(self.reads_future(k, scope) for k, (kind, _) in scope.decls.items() if kind == "eq")
            args.append(self.lookup(eq_name, -1 if back else 1, scope, span, timed=True))
        n = self.mk(fn, [*args, (mask, 0)], span, p=p)
        self.g.nodes[mask]["noise_of"] = n
        self.masks[name] = mask
        return (n, 0)

    def loss(self, e: S.Call, scope: Scope) -> Ref:
        if len(e.args) != 2:
            raise self.error(f"{e.fn} takes 2 arguments (prediction, target)", e.span, code="E208")
        mode = "sum"
        for key, v in e.kwargs:
            if key != "time" or not isinstance(v, S.Name) or v.name not in ("sum", "mean"):
                raise self.error(
                    f"{e.fn}: the only option is time=sum or time=mean", v.span, code="E208"
                )
            mode = v.name
        a, b = (self.expr(x, scope) for x in e.args)
        if e.fn == "dot":  # a linear loss: its gradient with respect to a is b (a VJP's seed)
            per_step = self.mk("sum_f", [(self.mk("mul", [a, b], e.span), 0)], e.span)
        else:
            per_step = self.mk("ce_probs" if e.fn == "cross_entropy" else "sqerr", [a, b], e.span)
        return (self.mk("loss_reduce", [(per_step, 0)], e.span, mode=mode, dom=None), 0)

    def final(self, e: S.Call, scope: Scope) -> Ref:
        if len(e.args) != 1 or not isinstance(e.args[0], S.Name):
            raise self.error("final takes the name of a recurrence: final(e)", e.span, code="E208")
        name = e.args[0].name
        inst = self.instances.get(scope.qualify(name))
        if inst is None:
            ref = self.expr(e.args[0], scope)
            backward = self.reads_future(name, scope)
            return (self.mk("first" if backward else "last", [ref], e.span, dom=None), 0)
        outs = [self.final_of(d, d.output, e.span) for d in inst.layers[-1]]
        return (self.merge(outs, inst.merge, e.span), 0)

    def final_of(self, d: DirInstance, ref: Ref, span: Span) -> int:
        return self.mk("first" if d.reversed else "last", [ref], span, dom=None)

    def reads_future(self, name: str, scope: Scope) -> bool:
        def walk(x):
            if isinstance(x, S.TimeRef) and x.name == name and x.delay * scope.flip < 0:
                return True
            if isinstance(x, S.Slice):
                return walk(x.expr)
            if isinstance(x, S.Neg):
                return walk(x.expr)
            if isinstance(x, S.BinOp):
                return walk(x.lhs) or walk(x.rhs)
            if isinstance(x, S.Call):
                return any(walk(a) for a in x.args)
            return False

        return any(walk(eq.expr) for k, eq in scope.decls.values() if k == "eq")

    # ----- cells -----
    def instantiate(self, e: S.Call, scope: Scope, eq_name: str) -> Ref:
        cell = self.cells[e.fn]
        if cell.name in self.calling:
            path = " -> ".join([*self.calling[self.calling.index(cell.name):], cell.name])
            raise self.error(f"cell {cell.name} calls itself ({path})", e.span,
                             hint="a cell's recurrence is written with h[t-1], not by calling "
                             "the cell again", code="E217")  # fmt: skip
        self.calling.append(cell.name)
        try:
            return self.instantiate_cell(cell, e, scope, eq_name)
        finally:
            self.calling.pop()

    def instantiate_cell(self, cell: S.Cell, e: S.Call, scope: Scope, eq_name: str) -> Ref:
        if len(e.args) != len(cell.inputs):
            raise self.error(
                f"cell {cell.name} takes {len(cell.inputs)} input(s), got {len(e.args)}",
                e.span,
                hint=f"defined at {cell.span}",
                code="E211",
            )
        bidir = next((m for m in e.mods if m.kind == "bidirectional"), None)
        rev = any(m.kind == "reverse" for m in e.mods)
        layers = next((int(m.arg) for m in e.mods if m.kind == "stack"), 1)  # type: ignore[arg-type]
        if layers < 1:
            raise self.error("stack(n) needs n >= 1", e.span, code="E212")
        merge = bidir.arg if bidir and bidir.arg else "concat"
        if merge not in MERGES:
            raise self.error(
                f"unknown merge '{merge}'", bidir.span if bidir else e.span,
                hint="bidirectional(concat|sum|mul|avg)", code="E212",
            )  # fmt: skip
        base = scope.qualify(eq_name or cell.name.lower())
        prefix, k = base, 2
        while prefix in self.used_prefixes:
            prefix, k = f"{base}{k}", k + 1
        self.used_prefixes.add(prefix)
        kwargs = dict(e.kwargs)
        init = kwargs.pop("init", None)
        args = [self.expr(a, scope) for a in e.args]
        inst = Instance(prefix, [], merge, e.span)
        for layer in range(layers):
            lp = prefix if layers == 1 else f"{prefix}.l{layer + 1}"
            dirs = [(lp, rev)] if not bidir else [(f"{lp}.fwd", rev), (f"{lp}.bwd", not rev)]
            outs, row = [], []
            for p, reversed_ in dirs:
                d = self.cell_body(cell, p, reversed_, args, kwargs, scope, e.span)
                row.append(d)
                outs.append(d.output)
                if init is not None:
                    self.deferred_inits.append((d, init, scope, e.span))
            inst.layers.append(row)
            merged = self.merge(outs, merge, e.span) if bidir else None
            args = [(merged, 0)] if merged is not None else [outs[0]]
        self.instances[prefix] = inst
        return args[0]

    def merge(self, outs: list, how: str, span: Span) -> int:
        if len(outs) == 1:
            return self.mk(
                "identity", [outs[0] if isinstance(outs[0], tuple) else (outs[0], 0)], span
            )
        refs = [o if isinstance(o, tuple) else (o, 0) for o in outs]
        if how == "concat":
            return self.mk("concat", refs, span, axis=-1)
        if how == "avg":
            s = self.mk("add", refs, span)
            return self.mk("mul", [(s, 0), (self.mk("const", [], span, value=0.5), 0)], span)
        return self.mk("add" if how == "sum" else "mul", refs, span)

    def cell_body(self, cell, prefix, reversed_, args, kwargs, outer: Scope, span) -> DirInstance:
        saved, self.prefix = self.prefix, prefix
        try:
            return self.cell_scope(cell, prefix, reversed_, args, kwargs, outer, span)
        finally:
            self.prefix = saved

    def cell_scope(self, cell, prefix, reversed_, args, kwargs, outer: Scope, span) -> DirInstance:
        scope = Scope(prefix, {}, {}, -1 if reversed_ else 1)
        local_dims = cell_dims(cell)
        for d in local_dims:
            scope.decls[d] = ("dim", None)
            scope.dims[d] = f"{prefix}.{d}"
        for stmt in cell.body:
            if isinstance(stmt, S.DimDecl):
                for it in stmt.items:
                    if it.default is not None and it.name not in kwargs:
                        self.g.graph["dim_constraints"].append(
                            (scope.dims[it.name], self.qdim(it.default, scope), it.span)
                        )
        for key, v in kwargs.items():
            if key not in local_dims:
                close = difflib.get_close_matches(key, [*local_dims, "init"], 1)
                raise self.error(
                    f"cell {cell.name} has no dimension or option '{key}'",
                    v.span,
                    hint=f"did you mean '{close[0]}'?" if close else
                    f"its dimensions: {', '.join(local_dims) or 'none'}; option: init",
                    code="E213",
                )  # fmt: skip
            dim = self.qdim(expr_to_dim(v, self), outer)
            self.g.graph["dim_constraints"].append((scope.dims[key], dim, v.span))
        for port, arg in zip(cell.inputs, args, strict=True):
            self.declare(scope, port.name, "node", None, port.span)
            n = self.mk("identity", [arg], port.span, name=scope.qualify(port.name))
            self.g.nodes[n]["declared"] = self.qdims(port.dims, scope)
            scope.decls[port.name] = ("port", n)
        for stmt in cell.body:
            match stmt:
                case S.ParamDecl(items):
                    for it in items:
                        self.declare(scope, it.name, "param", it, it.span)
                        scope.decls[it.name] = ("param", self.leaf("param", it, scope))
                case S.Equation(name, _, gen, sp):
                    if gen:
                        raise self.error("generate rules belong in a model", sp, code="E204")
                    self.declare(scope, name, "eq", stmt, sp)
                case S.InputDecl() | S.TargetDecl():
                    raise self.error(
                        "a cell's inputs are its ports: cell Name(x[I]) -> h[H]", stmt.span,
                        code="E214",
                    )  # fmt: skip
        if scope.decls.get(cell.output.name, ("", None))[0] != "eq":
            raise self.error(
                f"cell {cell.name} declares output '{cell.output.name}' but no equation defines it",
                cell.output.span,
                code="E215",
            )
        self.build_equations(scope)
        out = scope.roots[cell.output.name]
        self.g.nodes[out]["declared"] = self.qdims(cell.output.dims, scope)
        return DirInstance(prefix, cell, reversed_, scope, (out, 0))

    # ----- after every equation is built -----
    def resolve(self) -> None:
        self.resolve_pending()
        for d, init, scope, span in self.deferred_inits:
            self.wire_init(d, init, scope, span)
        for u in sorted({u for u, _, e in self.g.edges(data=True) if e["delay"] != 0}):
            if not any(e["pos"] == "init" for _, _, e in self.g.in_edges(u, data=True)):
                name = self.g.nodes[u]["name"] or f"%{u}"
                n = add_node(self.g, "state_init", (), f"{name}.init", self.g.nodes[u]["span"],
                             state=name)  # fmt: skip
                set_init(self.g, u, n)
        self.fuse_softmax_losses()

    def wire_init(self, d: DirInstance, init: S.Expr, scope: Scope, span: Span) -> None:
        if isinstance(init, S.Name) and init.name == "learned" and "learned" not in scope.decls:
            for s in self.states_of(d):
                set_init(self.g, s, self.learned_init(d, s, span))
            return
        is_final = isinstance(init, S.Call) and init.fn == "final"
        src = self.instances.get(scope.qualify(init.args[0].name)) if is_final and init.args and \
            isinstance(init.args[0], S.Name) else None  # fmt: skip
        states = self.states_of(d)
        if src is None:
            ref = self.expr(init, scope)
            self.resolve_pending()
            out = d.output[0]
            if out not in states:
                raise self.error(
                    f"init= sets the output '{d.cell.output.name}', which is not a recurrence",
                    span,
                    code="E402",
                )
            set_init(self.g, out, self.mk("identity", [ref], span))
            return
        layer = next((i for i, row in enumerate(self.instances_rows(d)) if d in row), 0)
        rows = src.layers
        src_row = rows[min(layer, len(rows) - 1)]
        idx = next(i for i, row in enumerate(self.instances_rows(d)) for x in row if x is d)
        src_d = src_row[min(self.instances_rows(d)[idx].index(d), len(src_row) - 1)]
        src_states = {self.local(src_d, s): s for s in self.states_of(src_d)}
        for s in states:
            local = self.local(d, s)
            if local not in src_states:
                raise self.error(
                    f"init=final({src.name}): '{src.name}' has no state '{local}' to start from",
                    span,
                    code="E402",
                )
            fin = self.final_of(src_d, (src_states[local], 0), span)
            set_init(self.g, s, fin)

    def learned_init(self, d: DirInstance, state: int, span: Span) -> int:
        """init=learned: a param `<state>0` (zeros at first) shaped like the state, e.g. h.l2.bwd.c0."""
        name = self.g.nodes[state]["name"] + "0"
        if name in self.g.graph["params"]:
            raise self.error(f"init=learned: the param '{name}' is already declared", span,
                             hint="rename that param", code="E402")  # fmt: skip
        n = add_node(self.g, "param", (), name, span, name=name)
        self.g.nodes[n].update(declared=None, init=None, scope=d.prefix, like=state)
        self.g.graph["params"][name] = n
        return n

    def resolve_pending(self) -> None:
        for node, pos, name, delay, scope, _span in self.pending:
            self.g.add_edge(scope.roots[name], node, pos=pos, delay=delay)
        self.pending.clear()

    def instances_rows(self, d: DirInstance) -> list[list[DirInstance]]:
        for inst in self.instances.values():
            if any(d in row for row in inst.layers):
                return inst.layers
        return [[d]]

    def local(self, d: DirInstance, node: int) -> str:
        return self.g.nodes[node]["name"][len(d.prefix) + 1 :]

    def states_of(self, d: DirInstance) -> list[int]:
        roots = set(d.scope.roots.values())
        return sorted(
            u for u in roots if any(e["delay"] != 0 for _, _, e in self.g.out_edges(u, data=True))
        )

    def fuse_softmax_losses(self) -> None:
        """cross_entropy(softmax(z), y) -> ce_logits(z, y): stable, and its adjoint is p - onehot;
        cross_entropy(sigmoid(z), y) -> ce_sigmoid(z, y) = softplus(-z[y]), likewise."""
        g = self.g
        for n in [n for n, d in g.nodes(data=True) if d["op"] == "ce_probs"]:
            (p, dp), (_y, _dy) = operands(g, n)
            src = p
            while g.nodes[src]["op"] == "identity" and dp == 0:
                (src, dp), = operands(g, src)  # fmt: skip
            fused = {"softmax": "ce_logits", "log_softmax": "ce_logits", "sigmoid": "ce_sigmoid"}
            if dp == 0 and g.nodes[src]["op"] in fused:
                (z, dz), = operands(g, src)  # fmt: skip
                g.remove_edges_from([(p, n, k) for k in list(g[p][n])])
                g.add_edge(z, n, pos=0, delay=dz)
                g.nodes[n]["op"] = fused[g.nodes[src]["op"]]

    def run(self) -> Graph:
        scope = self.model_scope()
        self.build_equations(scope)
        self.resolve()
        g = self.g
        for name, root in scope.roots.items():
            g.graph["outputs"][name] = root
        if "loss" in scope.roots:
            g.graph["loss"] = scope.roots["loss"]
        g.graph["instances"] = {
            k: [[d.prefix for d in row] for row in inst.layers]
            for k, inst in self.instances.items()
        }
        g.graph["cells"] = {k: inst.layers[0][0].cell.name for k, inst in self.instances.items() if inst.layers}
        g.graph["cell_defs"] = {k: inst.layers[0][0].cell for k, inst in self.instances.items() if inst.layers}
        g.graph["model_span"] = self.model.span
        return g


def cell_dims(cell: S.Cell) -> list[str]:
    """Dimension names a cell uses: declared, or appearing in its ports, params and slices."""
    names: list[str] = []

    def add(d):
        match d:
            case S.DName(n) if n not in names:
                names.append(n)
            case S.DBin(_, a, b):
                add(a)
                add(b)

    for p in (*cell.inputs, cell.output):
        for d in p.dims:
            add(d)
    for stmt in cell.body:
        if isinstance(stmt, S.DimDecl):
            for it in stmt.items:
                if it.name not in names:
                    names.append(it.name)
        if isinstance(stmt, S.ParamDecl):
            for it in stmt.items:
                for d in it.dims:
                    add(d)
        if isinstance(stmt, S.Equation):
            stack = [stmt.expr]
            while stack:
                x = stack.pop()
                if isinstance(x, S.Slice):
                    for d in (x.start, x.stop):
                        if d is not None:
                            add(d)
                    stack.append(x.expr)
                elif isinstance(x, S.BinOp):
                    stack += [x.lhs, x.rhs]
                elif isinstance(x, S.Neg):
                    stack.append(x.expr)
                elif isinstance(x, S.Call):
                    stack += list(x.args) + [v for _, v in x.kwargs]
    return names


def expr_to_dim(e: S.Expr, ctx: Elaborator) -> S.DimExpr:
    """A keyword argument like H=2*H, read as a dimension expression."""
    match e:
        case S.Num(v, span) if v == int(v) and v >= 0:
            return S.DNum(int(v), span)
        case S.Name(n, span):
            return S.DName(n, span)
        case S.BinOp(op, a, b, span) if op in "+-*":
            return S.DBin(op, expr_to_dim(a, ctx), expr_to_dim(b, ctx), span)
    raise ctx.error("a dimension must be a whole number or dims combined with + - *", e.span,
                    code="E208")  # fmt: skip


def pick_model(program: S.Program, name: str | None = None) -> S.Model:
    models = [m for m in program.items if isinstance(m, S.Model)]
    seen: dict[str, Span] = {}
    for item in program.items:
        if item.name in seen:
            raise RnncError(
                f"'{item.name}' is defined twice",
                item.span,
                hint=f"first defined at {seen[item.name]}",
                code="E202",
            )
        seen[item.name] = item.span
    if not models:
        raise RnncError(
            "the file defines no model",
            Span(program.file, 1, 1, 1, 2),
            hint="add `model name { ... }` that uses the cells",
            code="E216",
        )
    if name is None:
        return models[-1]
    for m in models:
        if m.name == name:
            return m
    raise RnncError(
        f"no model named '{name}'", Span(program.file),
        hint="models here: " + ", ".join(m.name for m in models), code="E216",
    )  # fmt: skip


def elaborate(program: S.Program, model: str | None = None) -> Graph:
    """The graph of one model (the last in the file unless named), `use`d cells brought in."""
    program = with_imports(program)
    return Elaborator(program, pick_model(program, model)).run()
