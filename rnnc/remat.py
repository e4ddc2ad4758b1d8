"""Checkpointing over time: the gradient of a long sequence in windows of k steps, holding one
window's activations at a time.

A first pass runs the forward function window by window and keeps only the state each window
starts from (T / k states). The backward pass then takes the windows last to first: each runs
the compiled loss_and_grads again from its saved state, seeded with the adjoint of the state it
hands on (the `window` argument of the generated functions), and hands the adjoint of the state
it started from to the window before. The sum over the windows is the whole sequence's loss and
gradient: the same arithmetic, so equal to the unwindowed gradient to rounding. With k near
√T the activations held are O(√T) where plain BPTT holds O(T), for one more forward pass.

Only a model whose steps talk to each other through carried states (h[t-1]) and nothing else
can be cut into windows: no reversed or bidirectional loops, no attention, no value of the
whole sequence (final(h), a head on the last step); `reason_not_windowable` says why not."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import RnncError
from .graph import Graph, init_of
from .ops import OPS

WHOLE = {  # the ops that see a whole sequence, in the words of the language
    "last": "last(...) (or final(...)) reads each sequence's last step",
    "first": "first(...) reads each sequence's first step",
    "impulse": "a per-sequence value enters at the first step only",
    "every": "[every] reads every step at once",
    "stack": "a value of every step is stacked into one",
}


def reason_not_windowable(g: Graph) -> tuple[str, Any] | None:
    """Why a model's steps cannot be cut into windows (and where), or None when they can."""
    if len(g.graph["domains"]) != 1:  # an encoder and a decoder, or a pyramid's halved steps
        return f"it has {len(g.graph['domains'])} time domains; windows cut one", None
    for n, d in g.nodes(data=True):
        if d.get("pair"):
            return "attention reads every step of a sequence at each step", d["span"]
        if OPS[d["op"]].kind == "collective" and d["op"] != "loss_reduce":
            return WHOLE.get(d["op"], f"'{d['op']}' reads the whole sequence at once"), d["span"]
        for u, _, e in g.in_edges(n, data=True):
            k = e["delay"]
            if k == 0:
                continue
            du = g.nodes[u]
            what = du.get("name") or du["op"]
            if k < 0:
                return f"'{what}' is read at a later step (t+{-k}): a backward recurrence", d["span"]
            if k != 1 or init_of(g, u) is None:
                return f"'{what}' is read {k} steps back; windows carry states read at t-1", d["span"]
    return None


def require_windowable(m) -> None:
    """Raise a worded error unless model m's gradient can be taken in windows."""
    if m.grad_graph is None:
        raise RnncError("checkpointing takes a gradient, and this model has no loss", code="E585")
    why = reason_not_windowable(m.graph)
    if why is not None:
        text, span = why
        raise RnncError(f"cannot checkpoint over time: {text}", span,
                        hint="train without --remat (the whole sequence's activations are kept)",
                        code="E585")  # fmt: skip


def window_length(T: int, every: int | None = None) -> int:
    """Steps per window: `every`, or ⌈√T⌉ (O(√T) states and activations held)."""
    return max(1, min(T, every if every else math.isqrt(max(T - 1, 0)) + 1))


def choose_window(m, remat: int | str | None, T: int, B: int, dtype) -> int | None:
    """Steps per window for a training step of T steps: None (no checkpointing), `remat`
    steps, or for remat="auto" ⌈√T⌉ steps when the whole step would not fit in memory and
    the model can be cut into windows (else None, and the memory check says why)."""
    from .memory import estimate, fits, have_bytes

    if remat is None:
        return None
    if remat == "auto":
        if fits(estimate(m, T, B, dtype).total, have_bytes()) or reason_not_windowable(m.graph) is not None:
            return None
        return window_length(T)
    require_windowable(m)
    return window_length(T, steps_per_window(remat))


def steps_per_window(every: Any) -> int | None:
    """`every` as a number of steps (None: ⌈√T⌉), or a worded error."""
    if every is None or (isinstance(every, (int, np.integer)) and not isinstance(every, bool) and every >= 1):
        return every
    raise RnncError(f"remat={every!r}: give a whole number of steps per window, at least 1"
                    + (" ('auto' is for training, rnnc.train.Trainer and --remat)" if every == "auto" else ""),
                    code="E585")  # fmt: skip


def sliced(arrays: dict, table: dict, lo: int, hi: int) -> dict:
    """The arrays of a window: per-step ones (their table's domain is not 'static') cut to steps
    lo..hi-1; the rest (per-sequence values, initial states) as they are."""
    return {k: (v[lo:hi] if k in table and table[k][1] != "static" else v) for k, v in arrays.items()}


def loss_and_grads(m, params: dict, inputs: dict, targets: dict, every: int | None = None,
                   lengths: dict | None = None, carry: dict | None = None,
                   return_carry: bool = False, with_inputs: bool = False, rng=None):  # fmt: skip
    """m.loss_and_grads(...) with the sequence cut into windows of `every` steps (⌈√T⌉ when
    None): the same loss and gradients, with one window's activations held at a time."""
    require_windowable(m)
    every = steps_per_window(every)
    mod = m.module
    xp = m.xp
    ((dom, _),) = m.graph.graph["domains"].items()
    seqs = [k for k, (_, lv, _) in mod.INPUTS.items() if lv == dom and k in inputs]
    if not seqs:
        raise RnncError("checkpointing needs an input sequence to take T from", code="E585")
    T, B = np.shape(inputs[seqs[0]])[:2]
    k = window_length(T, every)
    if mod.MASKS and rng is not None:  # one draw for the whole sequence, cut like the inputs
        inputs = {**inputs, **mod.draw_masks(inputs, rng, dtype_of(params))}
    table = {**mod.INPUTS, **mod.TARGETS, **{n: (s, lv, False) for n, (s, lv, *_) in mod.MASKS.items()}}
    L = None if lengths is None or dom not in lengths else np.asarray(lengths[dom])
    steps = np.full(B, T) if L is None else L
    bounds = [(lo, min(lo + k, T)) for lo in range(0, T, k)]

    def window_lengths(lo: int, hi: int) -> dict | None:
        return None if L is None else {dom: np.clip(L - lo, 0, hi - lo)}

    starts = [carry]  # the state each window starts from (None: the initial states)
    for lo, hi in bounds[:-1]:
        _, c = mod.forward(params, sliced(inputs, table, lo, hi), window_lengths(lo, hi), starts[-1],
                           return_carry=True, window={"steps": steps, "dcarry": {}})  # fmt: skip
        starts.append({key: v.copy() for key, v in c.items()})  # not a view of the window's arrays
    total, grads, dcarry, final, order = 0.0, {}, {}, None, []
    per_step: dict[str, list] = {}
    for j in range(len(bounds) - 1, -1, -1):
        lo, hi = bounds[j]
        out = mod.loss_and_grads(params, sliced(inputs, table, lo, hi), sliced(targets, table, lo, hi),
                                 window_lengths(lo, hi), starts[j], return_carry=j == len(bounds) - 1,
                                 with_inputs=with_inputs, window={"steps": steps, "dcarry": dcarry})  # fmt: skip
        total += out[0]
        final = out[2] if len(out) == 3 else final
        dcarry = {}
        for name, v in out[1].items():
            if name.startswith("carry/"):
                dcarry[name[len("carry/"):]] = v
            elif name in mod.INPUTS and mod.INPUTS[name][1] == dom:
                per_step.setdefault(name, []).append(v)
            else:  # a window that continues from a carry gives its initial states 0
                grads[name] = v if name not in grads else grads[name] + v
        order = [name for name in out[1] if not name.startswith("carry/")]
    for name, parts in per_step.items():
        grads[name] = xp.concatenate(parts[::-1], axis=0)
    grads = {name: grads[name] for name in order}  # the unwindowed function's order
    return (total, grads, final) if return_carry else (total, grads)


def dtype_of(params: dict):
    return np.result_type(*(p.dtype for p in params.values())) if params else np.float64
