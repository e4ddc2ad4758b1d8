"""Plan -> Python source: a standalone, readable NumPy module (no rnnc import).

Names come from the spec (`h1.fwd.c` -> `h1_fwd_c`), adjoints are `d<name>`, each statement
sits under a comment quoting its equation, and single-use temporaries are inlined so that a
step reads like the equation it came from.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import inspect
import keyword
import re
from typing import Any

import networkx as nx

from . import kernels
from .errors import RnncError
from .fuse import Kernel, needs_mask
from .graph import Graph, forward_outputs, init_of, is_seq, operands, order, source_line
from .interpret import context
from .ops import OPS, operand_text, render, slot_prec_of, slot_uses
from .schedule import Loop, Once, Plan
from .target_cupy import CupyTarget
from .target_numba import NativeTarget
from .target_numpy import NumpyTarget, at

MAX_NAME = 24
MAX_INLINE = 40  # operators folded into one statement


class Namer:
    """One owner of Python names: spec names first, then names built from operands."""

    def __init__(self, g: Graph):
        self.g = g
        self.names: dict[int, str] = {}
        self.taken = set(dir(kernels)) | set(dir(builtins)) | set(keyword.kwlist) | {"np", "params", "inputs", "targets", "lengths", "carry",
                                          "dt", "B", "t", "rng", "out", "grads"}  # fmt: skip
        # every target's own module names (the native prelude's tanh, CuPy's launch): the
        # same names in every target's code
        self.taken |= NativeTarget.reserved() | CupyTarget.reserved()

    def __call__(self, n: int) -> str:
        if n not in self.names:
            self.names[n] = self.fresh(self.base(n))
        return self.names[n]

    def base(self, n: int) -> str:
        """A name from the spec's roles: the value's own name; d<name> for its adjoint;
        d<name>_next (_prev) for what a state's adjoint gets from the next (previous) step,
        d<name>_from_<equation> for what it gets through another equation; the names of
        the parts a merged value holds (h_Wfigo, h_if); <equation>_<op> for the rest."""
        g, d = self.g, self.g.nodes[n]
        if d["name"]:
            return ident(d["name"])
        adj = d.get("adjoint_of")
        if adj is not None and d.get("adjoint"):
            return "d" + self.base(adj)  # the adjoint itself: d<name>
        if adj is not None:
            into = self.adjoint_term(n, adj)
            if into:
                return into
            if d["op"] != "matmul":
                return f"{self.base(adj)}_{d['op']}"  # a piece of a VJP, e.g. 1 - s*s is s_sub
        op = d["op"]
        if op == "every":  # e[s]: e_s, every step s of e
            return self.base(operands(g, n)[0][0]) + "_s"
        if op == "matmul":
            w, x = (self.base(u) for u, _ in operands(g, n))
            if len(w) + len(x) <= 12:  # Uh for U @ h; h_Urzn_h_h for h.Urzn @ h.h
                return w + ("_" if "_" in w + x else "") + x
        parts = [v for _, v in g.out_edges(n) if g.nodes[v]["op"] == "slice" and g.nodes[v]["name"]]
        if op == "concat":  # its parts, or what they are slices of (an LSTM's W_f, W_i, ...)
            parts = [self.named_source(u) for u, _ in operands(g, n)]
            parts = parts if all(parts) else []
        if len(parts) > 1:
            return joined([ident(g.nodes[u]["name"]) for u in parts])
        eq = self.equation_of(n)
        return f"{ident(eq)}_{op}" if eq else op

    def named_source(self, u: int) -> int | None:
        """u if it has a name, or the named value u is a slice of."""
        g = self.g
        while not g.nodes[u]["name"] and g.nodes[u]["op"] == "slice":
            ((u, _),) = operands(g, u)
        return u if g.nodes[u]["name"] else None

    def equation_of(self, n: int) -> str | None:
        """The name the equation that made n defines (n's scope, file and line)."""
        if not hasattr(self, "equations"):
            self.equations: dict[tuple, str] = {}
            for m, d in sorted(self.g.nodes(data=True)):
                if d["name"] and "adjoint_of" not in d and d["span"].line and OPS[d["op"]].kind != "leaf":
                    self.equations.setdefault(self.where(m), d["name"])
        d = self.g.nodes[n]
        return self.equations.get(self.where(n)) if d["span"].line else None

    def where(self, n: int) -> tuple:
        d = self.g.nodes[n]
        return self.scope_of(n), d["span"].file, d["span"].line

    def scope_of(self, n: int, depth: int = 0) -> str | None:
        """n's cell instance; for a value the optimizer made (merged gates), its operands'."""
        scope = self.g.nodes[n].get("scope")
        if scope is None and depth < 4:
            scope = next((s for u, _ in operands(self.g, n) if (s := self.scope_of(u, depth + 1))), None)
        return scope

    def adjoint_term(self, n: int, adj: int) -> str | None:
        """d<state>_next / _prev / _from_<equation>: a term of a named adjoint's sum."""
        g = self.g
        for _, v, e in g.out_edges(n, data=True):
            dv = g.nodes[v]
            if not (dv["name"] and dv.get("adjoint") and dv["op"] == "sum"):
                continue
            target = ident(dv["name"])
            if e["delay"]:
                return f"{target}_{'next' if e['delay'] < 0 else 'prev'}"
            eq = g.nodes[adj]["name"] or self.equation_of(adj)
            if eq:
                return f"{target}_from_{ident(eq.rsplit('.', 1)[-1])}"
        return None

    def fresh(self, base: str) -> str:
        base = base[:MAX_NAME]
        if base in self.taken or keyword.iskeyword(base):
            k = 2
            while f"{base}{k}" in self.taken:
                k += 1
            base = f"{base}{k}"
        self.taken.add(base)
        return base


def joined(names: list[str]) -> str:
    """One name for the parts of a merged value: h_Wf, h_Wi -> h_Wfi; h_i, h_f -> h_if."""
    k = next((i for i, cs in enumerate(zip(*names, strict=False)) if len(set(cs)) > 1),
             min(map(len, names)))  # the common prefix's length  # fmt: skip
    tails = [x[k:] for x in names]
    if not all(tails):
        return names[0]
    return names[0][:k] + ("".join(tails) if all(len(t) == 1 for t in tails) else "_".join(tails))


def ident(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    return s if s[:1].isalpha() or s[:1] == "_" else "v" + s


class Emitter:
    def __init__(self, plan: Plan, namer: Namer, dims: dict[str, int],
                 target: NumpyTarget | None = None, fname: str = "f"):  # fmt: skip
        self.plan, self.g, self.name = plan, plan.graph, namer
        self.target = target or NumpyTarget()
        self.loops = plan.loop_of()
        self.loop_ids = {id(s): i for i, s in enumerate(plan.steps)}
        self.xp = self.target.xp
        self.running = plan.running if self.target.running else set()
        # the same adjoints where a target's kernels read and write rows: two rows, t % 2
        self.paired = plan.running if self.target.paired else set()
        # each loop body as array code and the target's own items (CuPy: generated kernels)
        self.fused = self.target.fuse(plan, fname, namer)
        self.kernels: list[Kernel] = [
            j for items in self.fused.values() for k in items if isinstance(k, Kernel)
            for j in (k, k.ahead) if j is not None
        ]  # fmt: skip
        self.inline = self.inlined()
        self.lines: list[str] = []

    # ----- which nodes fold into their single consumer -----
    def inlined(self) -> set[int]:
        g, plan = self.g, self.plan
        keep = {n for s in plan.steps for n in ([s.node] if isinstance(s, Once) else s.nodes)}
        read = {a.node for k in self.kernels for a in k.args}  # a kernel reads a variable
        out = set()
        for n in keep:
            d = g.nodes[n]
            if d["name"] or OPS[d["op"]].kind == "leaf" or n in plan.wanted.values() or n in read:
                continue
            if n in plan.stored or plan.pads.get(n, (0, 0)) != (0, 0):
                continue
            edges = [(v, e) for _, v, e in g.out_edges(n, data=True) if v in keep]
            if len(edges) != 1 or edges[0][1]["delay"] != 0 or edges[0][1]["pos"] == "init":
                continue
            consumer, e = edges[0]
            if self.loops.get(n) != self.loops.get(consumer):
                continue
            if self.in_kernel(n) or self.in_kernel(consumer):
                continue
            if slot_uses(OPS[g.nodes[consumer]["op"]], e["pos"]) != 1:
                continue
            out.add(n)
        return self.short_chains(out)

    def short_chains(self, inline: set[int]) -> set[int]:
        """Break chains of inlined nodes every MAX_INLINE levels into statements: the
        emitter recurses once per level, and a long line reads worse than a few."""
        depth: dict[int, int] = {}
        for n in order(self.g):
            below = [depth.get(u, 0) for u, _ in operands(self.g, n) if u in inline]
            depth[n] = 1 + max(below, default=0)
            if n in inline and depth[n] > MAX_INLINE:
                inline.discard(n)
                depth[n] = 0
        return inline

    def in_kernel(self, n: int) -> bool:
        return any(n in k.nodes for k in self.kernels)

    # ----- expressions -----
    def fill(self, u: int) -> str:
        init = init_of(self.g, u)
        return self.name(init) if init is not None else "0.0"

    def seq_read(self, u: int, k: int, loop: Loop | None) -> str:
        g = self.g
        base = self.plan.views.get(u)
        if base is not None and not (
            loop is not None and self.loops.get(u) == self.loop_ids[id(loop)]
        ):
            a = g.nodes[u]["attrs"]
            return f"{self.seq_read(base, k, loop)}[..., {a['start']}:{a['stop']}]"
        past, fut = self.plan.pads.get(u, (0, 0))
        ctx = context(g, u)
        T = ctx["T"]
        name = self.name(u)
        if loop is not None:
            if self.loops.get(u) == self.loop_ids[id(loop)] and k == 0:
                return name + "_t"
            plain = f"{name}_run" if u in self.running else self.row_text(u, "t", past - k)
            if k == 0 or self.unmasked(u, k):
                return plain
            V = self.mask_name(u, k)
            nd = "[:, None]" * len(g.nodes[u]["shape"])
            return f"({plain} if {V} is None else {self.xp}.where({V}[t]{nd}, {plain}, {self.fill(u)}))"
        if k == 0:
            return name if (past, fut) == (0, 0) else f"{name}[{past}:{past} + {T}]"
        lo = past - k
        plain = f"{name}[{lo}:{lo} + {T}]"
        if self.unmasked(u, k):
            return plain
        V = self.mask_name(u, k)
        nd = "[..., None]" * len(g.nodes[u]["shape"])
        return f"({plain} if {V} is None else {self.xp}.where({V}{nd}, {plain}, {self.fill(u)}))"

    def unmasked(self, u: int, k: int) -> bool:
        return not needs_mask(self.g, u, k)

    def operand(self, u: int, k: int, loop: Loop | None) -> tuple[str, int]:
        """The text of operand u read at delay k, with its precedence."""
        d = self.g.nodes[u]
        if d["op"] == "const":
            v = d["attrs"]["value"]
            return repr(v), 9 if v >= 0 else 4
        if u in self.inline:
            return self.expr(u, loop), OPS[d["op"]].prec
        if is_seq(d["level"]):
            text = self.seq_read(u, k, loop)
            return text, 9
        return self.name(u), 9

    def expr(self, n: int, loop: Loop | None) -> str:
        g, d = self.g, self.g.nodes[n]
        op = OPS[d["op"]]
        args = []
        whole = loop is None and is_seq(d["level"])
        for i, (u, k) in enumerate(operands(g, n)):
            text, prec = self.operand(u, k, loop)
            du = g.nodes[u]
            if whole and d["pair"] and not du["pair"] and is_seq(du["level"]) and op.pair is None:
                text, prec = f"{text if prec >= 9 else f'({text})'}[:, None]", 9  # [T, B] -> [T, 1, B]: each s
            bcast = operand_text(text, du["shape"], du["level"], d["shape"])
            need = 9 if bcast != text else slot_prec_of(op.name, i)
            if prec < need:
                text = f"({text})"
            args.append(operand_text(text, du["shape"], du["level"], d["shape"]))
        ctx = context(g, n, "t")
        (u, _), *_ = operands(g, n) or [(None, 0)]
        if d["op"] == "edge_sum" and u in self.running:  # its step-0 value, kept running
            return f"edge_first({self.name(u)}_run, carry is not None)"
        if d["op"] == "edge_sum" and u in self.paired:  # its step-0 value: row 0 of the two
            return f"edge_first({self.name(u)}[0], carry is not None)"
        return render(op, args, d["attrs"], ctx, whole)

    # ----- statements -----
    def comment(self, n: int, indent: str, seen: set) -> None:
        d = self.g.nodes[n]
        sp = d["span"]
        text = source_line(self.g, sp)
        key = (sp.file, sp.line, "adjoint_of" in d)
        if not text or key in seen:
            return
        seen.add(key)
        what = "adjoint of: " if "adjoint_of" in d else ""
        where = f"{sp.file.rsplit('/', 1)[-1]}:{sp.line}"
        self.lines.append(f"{indent}# {what}{text}  ({where})")

    def emit(self, pause: tuple[int, list[str]] | None = None) -> list[str]:
        """The body's statements; with pause = (i, lines), those lines before step i."""
        self.masks: set[tuple[str, str, int]] = set()
        self.started = False  # a backward loop hands a carried state's adjoint to the window before
        body: list[str] = []
        self.lines = body
        seen: set = set()
        frees = self.frees()
        for i, step in enumerate(self.plan.steps):
            if pause is not None and pause[0] == i:
                body += pause[1]
            if frees.get(i):
                body.append(f"    del {', '.join(sorted(frees[i]))}  # no later step reads these")
            if isinstance(step, Once):
                n = step.node
                if n in self.inline or OPS[self.g.nodes[n]["op"]].kind == "leaf":
                    continue
                self.comment(n, "    ", seen)
                body += self.once(n)
            else:
                self.loop(step, seen)
        return body

    def reads(self, n: int) -> set[int]:
        """The variables n's statement reads (through operands folded into it)."""
        out = set()
        for k in self.kernels:
            if n in k.nodes:  # a kernel reads its inputs (some are sources of views)
                out |= {a.node for a in k.args if not a.out and not a.mask}
        for u, _ in operands(self.g, n):
            if u in self.inline:
                out |= self.reads(u)
            else:
                out.add(self.plan.views.get(u, u))
        return out

    def frees(self) -> dict[int, set[str]]:
        """Before step i: the names of the arrays no step from i on reads."""
        return {i: {self.name(u) + ("_run" if u in self.running else "") for u in nodes}
                for i, nodes in self.dead_before().items()}  # fmt: skip

    def dead_before(self) -> dict[int, set[int]]:
        """Before step i: the arrays no step from i on reads (a memory plan: the backward
        pass keeps only what it reads)."""
        g, plan = self.g, self.plan
        keep = set(plan.wanted.values())
        keep |= {n for n, (past, _) in plan.pads.items() if past and init_of(g, n) is not None}
        keep |= {init_of(g, n) for n in g.nodes if init_of(g, n) is not None}
        last: dict[int, int] = {}
        made: dict[int, int] = {}
        for i, step in enumerate(plan.steps):
            nodes = [step.node] if isinstance(step, Once) else step.nodes
            for n in nodes:
                made[n] = i
                for u in self.reads(n):
                    last[u] = i
        out: dict[int, set[str]] = {}
        for u, i in last.items():
            d = g.nodes[u]
            if u in keep or u in self.inline or OPS[d["op"]].kind == "leaf" or u not in made:
                continue
            if isinstance(plan.steps[made[u]], Loop) and u not in plan.stored:
                continue  # a loop-local value, not an array
            if i + 1 < len(plan.steps):
                out.setdefault(i + 1, set()).add(u)
        return out

    def once(self, n: int) -> list[str]:
        """The statement of a value computed once over all steps. A sum whose first term is a
        product over the whole sequence (the input projection plus a bias) adds the rest into
        that product's array: a second [T, B, ...] array is another pass over memory that has
        to be mapped afresh (13 of 23 ms for an LSTM's projection at T = 100, B = 32, H = 256)."""
        g, d, name = self.g, self.g.nodes[n], self.name(n)
        terms = operands(g, n)
        if d["op"] == "add" and n not in self.plan.pads and terms[0][0] in self.inline:
            first = g.nodes[terms[0][0]]
            second = g.nodes[terms[1][0]]
            if (first["op"] in ("matmul", "matmul_t") and first["level"] == d["level"] and is_seq(d["level"])
                    and tuple(first["shape"]) == tuple(d["shape"]) == tuple(second["shape"])
                    and not d["pair"]):  # fmt: skip
                rest = self.operand(*terms[1], None)[0]
                return [f"    {name} = {self.expr(terms[0][0], None)}", f"    {name} += {rest}"]
        return [f"    {name} = {self.padded(n, self.expr(n, None))}"]

    def padded(self, n: int, text: str) -> str:
        """A sequence read at t-k gets rows of its initial value around its T steps."""
        past, fut = self.plan.pads.get(n, (0, 0))
        if (past, fut) == (0, 0):
            return text
        carried = ""
        if past and init_of(self.g, n) is not None:
            key = self.g.nodes[n]["name"]
            carried = f", carried_in(carry, {key!r})"
        return f"pad_time({text}, {past}, {fut}, {self.fill(n)}{carried})"

    def loop(self, loop: Loop, seen: set) -> None:
        g, out, xp = self.g, self.lines, self.xp
        ctx = context(g, loop.nodes[0])
        T = ctx["T"]
        for n in loop.nodes:
            if n not in self.plan.stored:
                continue
            past, fut = self.plan.pads.get(n, (0, 0))
            d = g.nodes[n]
            name = self.name(n)
            shape = tuple(d["shape"])
            key = self.handed_on(n)  # a window starts it from the adjoint handed in (else 0)
            given = None if key is None else f"adjoint_in(window, {key!r}, (B,) + {shape!r}, dt)"
            if n in self.running:  # the next step's value, 0 past the end
                out.append(f"    {name}_run = {given or f'{xp}.zeros((B,) + {shape!r}, dt)'}")
                continue
            if n in self.paired:  # rows t % 2: this step's and the next one's (0 past the end)
                out.append(f"    {name} = {xp}.empty((2, {rows(d)}) + {shape!r}, dt)")
                out.append(f"    {name}[{T} % 2] = {given or self.fill(n)}")
                continue
            out.append(f"    {name} = {xp}.empty(({past} + {T} + {fut}, {rows(d)}) + {shape!r}, dt)")
            if past:
                fill = self.fill(n)
                if init_of(g, n) is not None:
                    key = d["name"]
                    out.append(f"    {name}[:{past}] = carried_in(carry, {key!r}, {fill})")
                else:
                    out.append(f"    {name}[:{past}] = {fill}")
            if fut:
                out.append(f"    {name}[{past} + {T}:] = {given or self.fill(n)}")
        for n in loop.nodes:  # sums over the steps, added up as the loop runs
            if n in self.plan.accumulate:
                d = g.nodes[n]
                out.append(f"    {self.name(n)} = {xp}.zeros(({rows(d)},) + {tuple(d['shape'])!r}, dt)")
        items = self.fused.get(self.loop_ids[id(loop)], [loop.nodes])
        self.target.before_loop(self, items, T)
        rng = f"range({T})" if loop.direction > 0 else f"range({T} - 1, -1, -1)"
        out.append(f"    for t in {rng}:")
        self.target.loop_start(self, items, loop, T, seen)
        for item in items:
            if not isinstance(item, list):
                self.target.item(self, item, loop, seen)
                continue
            for n in item:
                self.statement(n, loop, seen)
        for n in loop.nodes:  # handed to the next step (t - 1) once this one is done
            if n in self.running:
                out.append(f"        {self.name(n)}_run = {self.name(n)}_t")
        handed = [(n, self.handed_on(n)) for n in loop.nodes] if loop.direction < 0 else []
        handed = [(n, key) for n, key in handed if key is not None]
        if handed:  # a window hands the adjoints of the states it started from back
            out.append("    if window is not None:")
            for n, key in handed:
                start = f"{self.name(n)}_run" if n in self.running else f"{self.name(n)}[0]"
                out.append(f"        started[{key!r}] = {start}")
            self.started = True

    def row_text(self, n: int, t: str, offset: int) -> str:
        """The row of stored value n at step t + offset: one of T + pads rows, or of two."""
        if n in self.paired:
            i = at(t, offset)
            return f"{self.name(n)}[{i if i.isidentifier() else f'({i})'} % 2]"
        return f"{self.name(n)}[{at(t, offset)}]"

    def handed_on(self, n: int) -> str | None:
        """The carried state whose adjoint a backward loop's value n hands to the step before
        (the term a step's read of the state at t - 1 gives it), or None. A window of a longer
        sequence starts that value from the adjoint the windows after it give its state."""
        for _, v in self.g.out_edges(n):
            d = self.g.nodes[v]
            if d["op"] == "edge_sum" and d["attrs"]["k"] == 1 and "state" in d["attrs"]:
                return d["attrs"]["state"]
        return None

    def mask_name(self, u: int, k: int) -> str:
        """The [T, B] mask of reads of u at t-k that fall inside the sequence (made once)."""
        ctx = context(self.g, u)
        V = f"V_{ctx['M'][2:]}_{k if k > 0 else 'm' + str(-k)}"
        self.masks.add((ctx["M"], V, k))
        return V

    def statement(self, n: int, loop: Loop, seen: set) -> None:
        """One node of a loop body as array code."""
        g, out = self.g, self.lines
        if n in self.inline:
            return
        self.comment(n, "        ", seen)
        name = self.name(n)
        if n in self.plan.accumulate:  # this step's term of a sum over the steps
            ((u, k),) = operands(g, n)
            out.append(f"        {name} += {self.operand(u, k, loop)[0]}")
            return
        past = self.plan.pads.get(n, (0, 0))[0]
        if (
            n in self.plan.stored
            and g.nodes[n]["op"] == "concat"
            and g.nodes[n]["attrs"].get("axis", -1) == -1
        ):
            # build the joined vector in its row of the buffer: no temporary, no copy
            out.append(f"        {name}_t = {self.row_text(n, 't', past)}")
            start = 0
            for u, k in operands(g, n):
                width = g.nodes[u]["shape"][-1]
                text, _ = self.operand(u, k, loop)
                out.append(f"        {name}_t[..., {start}:{start + width}] = {text}")
                start += width
            return
        out.append(f"        {name}_t = {self.expr(n, loop)}")
        if n in self.plan.stored and n not in self.running:
            out.append(f"        {self.row_text(n, 't', past)} = {name}_t")

# ----- the module -----

HEADER = '''"""{model}: generated by rnnc from {file}. Do not edit; edit the spec.

{spec}
Layout: sequences are [T, B, features], per-sequence values [B, features], parameters as
declared. Dims: {dims}.
forward(params, inputs) -> outputs; loss(params, inputs, targets) -> outputs with "loss";
loss_and_grads(params, inputs, targets) -> (loss, grads). Optional arguments:
lengths={{domain: [B] ints}} for sequences shorter than T (losses and states stop at each
length), carry=... the state carried in from a previous window (truncated BPTT; see
return_carry). Initial states may be given as inputs["<state>.init"]. rng=a NumPy Generator
trains: dropout and zoneout masks are drawn from it (or taken from inputs[name], see
draw_masks); without one the model evaluates (no dropout, zoneout at its expectation).
window={{"steps": [B] ints, "dcarry": {{state: [B, ...]}}}} makes a call one window of a longer
sequence (checkpointing, rnnc.remat): losses weigh steps by the whole sequence's lengths, a
sequence may have no step in it (length 0), and the gradient takes in the adjoint of the
returned carry from the windows after it and gives (as grads["carry/<state>"]) the adjoint of
the state the window started from.
"""'''


def leaf_binding(g: Graph, n: int, name: str) -> str | None:
    d = g.nodes[n]
    op, key = d["op"], d["attrs"].get("name")
    if op == "param":
        return f"{name} = params[{key!r}]"
    if op in ("input", "target"):
        src = "inputs" if op == "input" else "targets"
        cast = "" if d["classes"] else ", dt"
        return f"{name} = np.asarray({src}[{key!r}]{cast})"
    return None


class Module:
    """Assembles the functions of one compiled model into one source file."""

    def __init__(self, g: Graph, plans: dict[str, Plan], spec_path: str, target: NumpyTarget):
        self.g, self.plans, self.path, self.target = g, plans, spec_path, target
        self.namer = Namer(g)
        self.kernels: list[Kernel] = []

    def function(self, fname: str, plan: Plan) -> list[str]:
        return [self.target.rewrite(line) for line in self.numpy_function(fname, plan)]

    def numpy_function(self, fname: str, plan: Plan) -> list[str]:
        g = self.g
        late: set[int] = set()  # vjp: the target leaves, read after the pause
        if fname == "vjp":
            plan, i, late = self.paused(plan)
        em = Emitter(plan, self.namer, g.graph.get("env", {}), self.target, fname)
        self.kernels += em.kernels
        used = {n for s in plan.steps for n in ([s.node] if isinstance(s, Once) else s.nodes)}
        if fname == "vjp":
            out = ", ".join(f"{k!r}: {self.output(n, em)}" for k, n in forward_outputs(g).items())
            resume = [f"    targets = yield {{{out}}}", "    check_data(inputs, INPUTS, targets, TARGETS)"]
            resume += ["    " + leaf_binding(g, n, self.namer(n)) for n in sorted(late)]
            body = em.emit(pause=(i, resume))
        else:
            body = em.emit()
        pro = [
            "    dt = np.result_type(*(p.dtype for p in params.values())) if params else np.float64",
            "    check_data(inputs, INPUTS"
            + (", targets, TARGETS)" if fname not in ("forward", "vjp") else ")"),
        ]
        pro += self.target.prologue()
        leaves = sorted(n for n in used if OPS[g.nodes[n]["op"]].kind == "leaf")
        for n in leaves:
            b = leaf_binding(g, n, self.namer(n)) if n not in late else None
            if b and g.nodes[n]["op"] == "param":
                b = self.target.param(b)
            if b:
                pro.append("    " + b)
        doms = self.domains(plan, leaves)
        pro += doms
        for n in leaves:
            d = g.nodes[n]
            if d["op"] == "state_init":
                v = self.namer(n)
                pro.append(f"    {v} = inputs.get({d['name']!r})")
                pro.append(f"    {v} = np.zeros((B,) + {tuple(d['shape'])!r}, dt) if {v} is None "
                           f"else np.asarray({v}, dt)")  # fmt: skip
        for n in leaves:  # dropout and zoneout masks: given, drawn from rng, or their expectation
            d = g.nodes[n]
            if d["op"] == "mask":
                lead = f"({context_names(d['level'])[0]}, B)" if is_seq(d["level"]) else "(B,)"
                a = d["attrs"]
                pro.append(f"    {self.namer(n)} = noise_mask(inputs.get({a['name']!r}), rng, {a['kind']!r}, "
                           f"{a['p']!r}, {lead} + {tuple(d['shape'])!r}, dt, {a['name']!r})")  # fmt: skip
        for n in leaves:  # an input read at other steps: rows of its initial value around it
            if g.nodes[n]["op"] == "input" and plan.pads.get(n, (0, 0)) != (0, 0):
                v = self.namer(n)
                pro.append(f"    {v} = {em.padded(n, v)}")
        for M, V, k in sorted(em.masks):
            pro.append(f"    {V} = None if {M} is None else valid_shift({M}, {k}{', window' if k == -1 else ''})")
        args = {
            "forward": "params, inputs, lengths=None, carry=None, return_carry=False, rng=None, window=None",
            "loss": "params, inputs, targets, lengths=None, carry=None, return_carry=False, rng=None,"
            " window=None",
            "loss_and_grads": "params, inputs, targets, lengths=None, carry=None, return_carry=False,"
            " with_inputs=False, rng=None, window=None",
            "loss_and_all_grads": "params, inputs, targets, lengths=None, carry=None,"
            " return_carry=False, rng=None, window=None",
            "vjp": "params, inputs, lengths=None, carry=None, return_carry=False, rng=None, window=None",
        }[fname]
        doc = {
            "forward": "The named outputs of the model for `inputs`.",
            "loss": "The named outputs and the loss.",
            "loss_and_grads": "The loss and its gradient for every param and initial state\n"
            "    (and every real-valued input, with_inputs=True).",
            "loss_and_all_grads": "loss_and_grads(..., with_inputs=True).",
            "vjp": "loss_and_grads(..., with_inputs=True) in two halves, a generator: it yields\n"
            "    the outputs after the forward pass, is sent the targets, and returns (loss, grads)\n"
            "    without running the forward pass again (the targets may depend on the outputs).",
        }[fname]
        lines = [f"def {fname}({args}):", f'    """{doc}"""']
        if fname == "loss_and_grads":
            lines += [
                "    if with_inputs:",
                "        return loss_and_all_grads(params, inputs, targets, lengths, carry, return_carry, rng, window)",
            ]
        if em.started:
            pro.append("    started = {}  # a window's adjoints of the states it started from")
        lines += pro + body
        lines += self.returns(fname, plan, em)
        return lines

    def domains(self, plan: Plan, leaves: list[int]) -> list[str]:
        g = self.g
        out, bound = [], {}
        for n in leaves:
            d = g.nodes[n]
            if d["op"] in ("input", "target") and is_seq(d["level"]):
                bound.setdefault(d["level"], self.namer(n))
        first_seq = next(iter(bound.values()), None)
        if first_seq is not None:
            out.append(f"    B = {first_seq}.shape[1]")
        else:
            stat = next(
                (self.namer(n) for n in leaves if g.nodes[n]["op"] in ("input", "target")), None
            )
            out.append(f"    B = {stat}.shape[0]" if stat else "    B = 1")
        table = g.graph["domains"]
        named = tuple(sorted(d for d in table if table[d]["halves"] is None))
        out.append(f"    check_lengths(lengths, {named!r})")
        for dom in sorted(table, key=lambda x: x.count("/")):
            ctx_names = context_names(dom)
            base = table[dom]["halves"]
            if base is not None:
                bT, bM = context_names(base)
                out.append(f"    {ctx_names[0]} = {bT} // 2")
                out.append(f"    {ctx_names[1]} = pairs_mask({bM})")
            elif dom in bound:
                T, M = ctx_names
                out.append(f"    {T} = {bound[dom]}.shape[0]")
                out.append(f"    {M} = step_mask(lengths, {dom!r}, {T}, B, window)")
            else:
                T, M = ctx_names
                out.append(f"    {T} = {M} = None")
        return out

    def paused(self, plan: Plan) -> tuple[Plan, int, set[int]]:
        """vjp: the plan with the steps that need no target first (an order that still
        respects every edge: none of them reads one that does), where it pauses, and the
        target leaves."""
        g = self.g
        targets = {n for n in g.graph["targets"].values() if n in g}
        late = set().union(*(nx.descendants(g, n) for n in targets)) if targets else set()
        before, after = [], []
        for s in plan.steps:  # in order: a step reading a later one's value is later too
            nodes = [s.node] if isinstance(s, Once) else s.nodes
            if any(n in late or any(u in late for u, _ in operands(g, n)) for n in nodes):
                after.append(s)
                late |= set(nodes)
            else:
                before.append(s)
        for name, n in forward_outputs(g).items():
            if n in late:  # made in a loop that also computes terms of the loss
                raise RnncError(f"vjp: the output '{name}' is computed with the loss",
                                code="E575")  # fmt: skip
        return dataclasses.replace(plan, steps=before + after), len(before), targets

    def output(self, n: int, em: Emitter) -> str:
        """A named value as the functions return it: a sequence zero past each length."""
        d = self.g.nodes[n]
        Ms = f", {context_names(d['pair'])[1]}" if d["pair"] else ""  # and zero past e's, for e[s]
        if is_seq(d["level"]):
            M = context_names(d["level"])[1]
            return f"zero_padding({em.seq_read(n, 0, None)}, {M}{Ms})"
        if d["pair"]:
            return f"zero_padding({self.namer(n)}{Ms})"
        return self.namer(n) if d["op"] != "const" else repr(d["attrs"]["value"])

    def returns(self, fname: str, plan: Plan, em: Emitter) -> list[str]:
        g = self.g
        out = []

        def value(n: int) -> str:
            return self.output(n, em)

        carry = "{" + ", ".join(self.carries(plan)) + "}"
        if fname in ("forward", "loss"):
            items = [f"{k!r}: {value(n)}" for k, n in plan.wanted.items()]
            out.append("    out = {" + ", ".join(items) + "}")
            out.append(f"    return (out, {carry}) if return_carry else out")
            return out
        grads = g.graph["grads"]
        items = []
        for name in g.graph["params"]:
            dn = grads.get(name)
            # a param the loss does not depend on (shape and dtype only: it may be on the host)
            zero = f"np.zeros(params[{name!r}].shape, params[{name!r}].dtype)"
            items.append(f"{name!r}: {value(dn) if dn is not None else zero}")
        for name in g.graph["inputs"]:
            if name in grads and "d" + name in plan.wanted:
                items.append(
                    f"{name!r}: {em.seq_read(grads[name], 0, None) if is_seq(g.nodes[grads[name]]['level']) else self.namer(grads[name])}"
                )
        for name, dn in grads.items():
            if name.endswith(".init"):
                items.append(f"{name!r}: {self.namer(dn)}")
        out.append("    grads = {" + ", ".join(items) + "}")
        if em.started:
            out.append("    if window is not None:  # the adjoints of the states the window started from")
            out.append("        grads.update({'carry/' + k: v for k, v in started.items()})")
        out.append(f"    loss = float({value(plan.wanted['loss'])})")
        out.append("    if return_carry:")
        out.append(f"        return loss, grads, {carry}")
        out.append("    return loss, grads")
        return out

    def carries(self, plan: Plan) -> list[str]:
        """The state to carry into the next window: each state's last rows."""
        g, items = self.g, []
        for n, (past, _) in sorted(plan.pads.items()):
            if past and init_of(g, n) is not None and "adjoint_of" not in g.nodes[n]:
                T, M = context_names(g.nodes[n]["level"])
                items.append(
                    f"{g.nodes[n]['name']!r}: final_rows({self.namer(n)}, {past}, {T}, {M})"
                )
        return items

    def source(self) -> str:
        g = self.g
        env = g.graph.get("env", {})
        dims = ", ".join(f"{k}={v}" for k, v in env.items() if "." not in k) or "none"
        spec = "\n".join("    " + line for line in g.graph.get("source", "").splitlines())
        header = HEADER.format(model=g.graph["model"], file=self.path, spec=spec, dims=dims)
        funcs = []
        for fname, plan in self.plans.items():
            funcs.append("\n".join(self.function(fname, plan)))
        params = {name: (tuple(g.nodes[n]["shape"]), *init_spec(g.nodes[n].get("init")))
                  for name, n in g.graph["params"].items()}  # fmt: skip
        meta = [f"PARAMS = {params!r}  # name: (shape, initializer, its arguments)"]
        for kind in ("inputs", "targets"):
            table = {name: (tuple(g.nodes[n]["shape"]), g.nodes[n]["level"], bool(g.nodes[n]["classes"]))
                     for name, n in g.graph[kind].items()}  # fmt: skip
            meta.append(
                f"{kind.upper()} = {table!r}  # name: (shape, time domain or 'static', labels?)"
            )
        masks = {
            name: (
                tuple(g.nodes[n]["shape"]),
                g.nodes[n]["level"],
                g.nodes[n]["attrs"]["kind"],
                g.nodes[n]["attrs"]["p"],
            )
            for name, n in g.graph.get("masks", {}).items()
            if n in g
        }  # fmt: skip  (a mask of a value the outputs never read is gone)
        meta.append(
            f"MASKS = {masks!r}  # name: (shape, time domain or 'static', dropout|zoneout, p)"
        )
        funcs.append(DRAW_MASKS)
        body = "\n\n\n".join(funcs)
        return self.target.module(header, "\n".join(meta), body, self.helpers, self.kernels)

    def helpers(self, code: str) -> str:
        """The kernels.py functions the code calls (and those they call), in file order,
        written for the target."""
        table = helper_sources()
        called = set(re.findall(r"\b(\w+)\(", code))
        need: set[str] = set()
        todo = [n for n in table if n in called]
        while todo:
            n = todo.pop()
            if n not in need:
                need.add(n)
                todo += list(table[n][2])
        order = sorted(need, key=lambda n: table[n][0])
        return "\n\n".join(self.target.helper(n, table[n][1]) for n in order)


DRAW_MASKS = '''def draw_masks(inputs, rng, dtype=np.float64):
    """The dropout and zoneout masks for a batch of `inputs`, drawn from `rng` as training
    draws them. Passed back in `inputs` (under these names) they fix the masks: to check
    gradients, or to share one batch's masks between processes."""
    return {name: noise_mask(None, rng, kind, p, noise_lead(inputs, INPUTS, dom) + shape, dtype, name)
            for name, (shape, dom, kind, p) in MASKS.items()}'''


def init_spec(init: Any) -> tuple[str | None, tuple]:
    return (None, ()) if init is None else (init.kind, tuple(init.args))


def rows(d: dict) -> str:
    """The leading axes of one step's (or one sequence's) value: B, or S, B for a value per
    step s of another sequence (attention)."""
    return f"{context_names(d['pair'])[0]}, B" if d["pair"] else "B"


def context_names(dom: str) -> tuple[str, str]:
    tag = "".join(c if c.isalnum() else "_" for c in dom)
    return f"T_{tag}", f"M_{tag}"


@functools.cache
def helper_sources() -> dict[str, tuple[int, str, set[str]]]:
    """kernels.py function -> (line, source, the helpers it calls)."""
    funcs = {n: f for n, f in vars(kernels).items() if inspect.isfunction(f)}
    out = {}
    for n, f in funcs.items():
        src = inspect.getsource(f).rstrip()
        body = src.split(":", 1)[1]
        out[n] = (f.__code__.co_firstlineno, src, {m for m in funcs if m != n and f"{m}(" in body})
    return out


TARGETS = {"numpy": NumpyTarget, "native": NativeTarget, "cupy": CupyTarget}


def lower(
    g: Graph, plans: dict[str, Plan], spec_path: str = "<spec>", target: str = "numpy"
) -> str:
    """The standalone module for a model's plans, written for `target` (TARGETS)."""
    return Module(g, plans, spec_path, TARGETS[target]()).source()
