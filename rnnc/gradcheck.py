"""Compiled gradients against finite differences, in float64 (`rnnc gradcheck`).

Directional derivatives, as torch's fast gradcheck and JAX's check_grads take them: for J
random directions v (Gaussian, scaled to each tensor's size) the analytic ⟨∇f, v⟩ is compared
with the central difference (f(θ + hv) − f(θ − hv)) / 2h, Richardson-extrapolated from h and
h/2 (error O(h⁴), so h can be large enough that round-off stays far below the bar). One row
per tensor — parameters, initial states, real-valued inputs — and one row over all of them at
once. A row's error is ‖a − n‖ / ‖n‖ over its J directions: for Gaussian directions this
estimates the norm-wise relative error of the tensor's gradient. A row past the tolerance is
tried again at steps h/10 and h/100 (a sharply curved loss) before it is reported. The batch has random lengths
and random initial states. Models with kinks (relu, ...) use a small plain step instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .check import require_loss
from .compiler import Model, compile_spec
from .memory import estimate, require_memory
from .ops import OPS

ALL = "(all at once)"


@dataclass
class Row:
    name: str
    shape: tuple
    checked: int  # directions
    error: float  # ‖analytic − numeric‖ / ‖numeric‖ over the directions; inf if not finite
    note: str = ""  # why a row failed other than by its error (a value that is not finite)


def random_batch(m: Model, T: int | dict[str, int], B: int, seed: int, dtype=np.float64):
    """Random inputs, targets and lengths (None) fitting the model's declarations; T steps,
    or T[d] for each time domain d (an encoder's source and a decoder's target)."""
    rng = np.random.default_rng(seed)
    halves = {d: info["halves"] for d, info in m.graph.graph["domains"].items()}

    def steps(dom: str) -> int:
        return steps(halves[dom]) // 2 if halves.get(dom) else T[dom] if isinstance(T, dict) else T

    def make(table):
        out = {}
        for name, (shape, level, labels) in table.items():
            lead = (steps(level), B) if level != "static" else (B,)
            if labels:
                out[name] = rng.integers(0, shape[0], size=lead)
            else:
                out[name] = rng.normal(size=lead + tuple(shape)).astype(dtype)
        return out

    return make(m.inputs), make(m.targets), None


def random_lengths(m: Model, T: int | dict[str, int], B: int, rng: np.random.Generator,
                   shortest: int = 2) -> dict | None:  # fmt: skip
    """One length per sequence in shortest..T (pairs() needs two steps), the first sequence
    full; T per time domain where it is a dict."""
    doms = [d for d, info in m.graph.graph["domains"].items() if info["halves"] is None]
    Ts = {d: T[d] if isinstance(T, dict) else T for d in doms}
    if not doms or min(Ts.values()) < shortest or B < 2:
        return None
    out = {}
    for d in doms:
        L = rng.integers(shortest, Ts[d] + 1, size=B)
        L[0] = Ts[d]
        out[d] = L
    return out


def initial_states(m: Model, B: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random start for every state (inputs["<state>.init"]), so their gradients count."""
    g = m.graph
    out = {}
    for _, d in g.nodes(data=True):
        if d["op"] == "state_init":
            out[d["name"]] = rng.normal(0, 0.5, size=(B, *d["shape"]))
    return out


def smooth(m: Model) -> bool:
    g = m.grad_graph if m.grad_graph is not None else m.graph
    return all(OPS[d["op"]].smooth for _, d in g.nodes(data=True))


def relative(a: np.ndarray, n: np.ndarray, floor: float) -> float:
    """‖a − n‖ / max(‖a‖, ‖n‖, floor), computed scaled so that values near 1e300 do not
    overflow the norms."""
    big = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(n), initial=0.0)))
    if big == 0:
        return 0.0
    a, n = a / big, n / big
    scale = max(float(np.linalg.norm(n)), float(np.linalg.norm(a)), floor / big)
    return float(np.linalg.norm(a - n) / scale)


def directional(
    loss: Callable[[], float], tensors: list[np.ndarray], dirs: list[np.ndarray], h: float,
    richardson: bool,
) -> float:  # fmt: skip
    """d/ds f(θ + s·v) at s = 0 by central differences, moving every tensor in place."""

    def at(step: float) -> float:
        for x, v in zip(tensors, dirs, strict=True):
            x += step * v
        try:
            return loss()
        finally:
            for x, v in zip(tensors, dirs, strict=True):
                x -= step * v

    def central(step: float) -> float:
        return (at(step) - at(-step)) / (2 * step)

    if not richardson:
        return central(h)
    return (4 * central(h / 2) - central(h)) / 3


TOL = 1e-7  # the default bar; an error at round-off level reports below it


def gradcheck(spec: str | Model, dims=None, model=None, T=5, batch=2, seed=0, eps=None,
              directions=8, lengths=True, target: str = "numpy") -> list[Row]:  # fmt: skip
    """One row per tensor and one over all tensors; see the module's docstring. A spec is
    compiled for `target`: by default the NumPy target, the reference, which checks at once
    (the native target equals it to 1e-12, tests/test_native.py, but compiles its loops first)."""
    with np.errstate(all="ignore"):  # a NaN or overflow is reported in the rows, not warned
        return check_all(spec, dims, model, T, batch, seed, eps, directions, lengths, target)


def check_all(spec, dims, model, T, batch, seed, eps, directions, lengths, target) -> list[Row]:
    m = spec if isinstance(spec, Model) else compile_spec(spec, target=target, dims=dims, model=model)
    if m.grad_graph is None:
        require_loss(m.graph)  # a worded error: there is nothing to differentiate
    require_memory(estimate(m, T, batch, np.float64).total,
                   f"checking {m.graph.graph['model']} at batch {batch} over {T:,d} steps")  # fmt: skip
    rng = np.random.default_rng(seed)
    params = m.init_params(seed, np.float64)
    for k in params:  # non-zero biases, so that every path is exercised
        params[k] = params[k] + rng.normal(0, 0.1, params[k].shape)
    # sequences of different clocks (an encoder's source, a decoder's target) of different
    # lengths, as attention meets them: each further clock a step shorter
    roots = [d for d, info in m.graph.graph["domains"].items() if info["halves"] is None]
    Ts = {d: max(2, T - i) for i, d in enumerate(roots)}
    inputs, targets, _ = random_batch(m, Ts, batch, seed)
    inputs.update(initial_states(m, batch, rng))
    inputs.update(m.module.draw_masks(inputs, rng))  # training's masks, fixed for the check
    L = random_lengths(m, Ts, batch, rng) if lengths else None
    plain = not smooth(m)
    h = eps if eps is not None else (1e-6 if plain else 1e-3)

    def f() -> float:
        return float(m.loss(params, inputs, targets, lengths=L)["loss"])

    base = f()
    _, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    names = [*params, *(k for k in inputs if k in grads and k not in params)]
    tensors = {k: params[k] if k in params else inputs[k] for k in names}
    for k in names:  # an input may be an integer array in the caller's data: work in float64
        if tensors[k].dtype != np.float64:
            tensors[k] = inputs[k] = np.asarray(tensors[k], np.float64)
    if not np.isfinite(base):
        return [Row("loss", (), 0, float("inf"), f"the loss itself is {base}")]
    # each direction scaled to its tensor's size, so a small weight is not swamped
    scale = {k: max(float(np.sqrt(np.mean(tensors[k] ** 2))), 0.1) for k in names}
    rows, analytic, numeric = [], {}, {}
    groups = [(k, [k]) for k in names] + [(ALL, names)]
    directions_of = {}
    for label, members in groups:
        a, n, note = np.zeros(directions), np.zeros(directions), ""
        dirs_j = []
        for j in range(directions):
            dirs = [rng.normal(size=tensors[k].shape) * scale[k] for k in members]
            dirs_j.append(dirs)
            a[j] = sum(float(np.sum(np.asarray(grads[k]) * v)) for k, v in zip(members, dirs, strict=True))
            n[j] = directional(f, [tensors[k] for k in members], dirs, h, not plain)
        if not np.all(np.isfinite(a)):
            note = "the compiled gradient is not finite"
        elif not np.all(np.isfinite(n)):
            note = "the loss is not finite near these values (try a smaller --eps)"
        analytic[label], numeric[label], directions_of[label] = a, n, dirs_j
        shape = tuple(np.shape(tensors[label])) if label != ALL else ()
        rows.append(Row(label, shape, directions, float("inf") if note else 0.0, note))
    largest = max((float(np.linalg.norm(a)) for a in analytic.values() if np.all(np.isfinite(a))),
                  default=0.0)  # fmt: skip

    def error(label: str, n: np.ndarray, step: float) -> float:
        # a row fails only if its error is past the tolerance and past round-off (as Theano's
        # verify_grad): the difference quotient carries about 10 ulps of f over the step
        roundoff = 10 * np.finfo(np.float64).eps * abs(base) / step * np.sqrt(directions)
        return relative(analytic[label], n, max(1e-9 * largest, roundoff / TOL))

    for row in rows:
        if row.note:
            continue
        row.error = error(row.name, numeric[row.name], h)
        step = h
        members = dict(groups)[row.name]
        while row.error > TOL and step > h / 100:  # a sharply curved loss: smaller steps
            step /= 10
            n = np.array([directional(f, [tensors[k] for k in members], dirs, step, not plain)
                          for dirs in directions_of[row.name]])  # fmt: skip
            if np.all(np.isfinite(n)):  # judged by h's round-off: a retry loosens nothing
                row.error = min(row.error, error(row.name, n, h))
    return rows
