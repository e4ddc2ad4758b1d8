"""Memory, checked before it is allocated: what a compiled plan will hold for a sequence length
and a batch size, and what this machine has free. NumPy's `np.zeros` of 16 GiB succeeds lazily
and the kernel kills the process later, so a run that cannot fit is refused up front."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import RnncError
from .graph import GLOBAL, STATIC, init_of
from .ops import OPS
from .schedule import Loop, Once, Plan

# a run may use this share of the memory the machine has free; the rest is for NumPy's
# temporaries inside expressions, the interpreter and the other programs on the machine
SHARE = 0.9


@dataclass(frozen=True)
class Estimate:
    """Bytes a run will hold at its peak, by kind."""

    params: int  # the parameters
    optimizer: int  # Adam's two moments or SGD's momentum
    activations: int  # every stored value of the forward pass and its adjoints
    data: int  # the batch itself

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.activations + self.data

    def describe(self) -> str:
        parts = [("parameters", self.params), ("optimizer state", self.optimizer),
                 ("activations and adjoints", self.activations), ("data", self.data)]  # fmt: skip
        return f"{fmt_bytes(self.total)} (" + ", ".join(
            f"{what} {fmt_bytes(n)}" for what, n in parts if n
        ) + ")"


def fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


Steps = int | dict[str, int]  # one length for every time domain, or one per domain


def steps_of(dom: str, T: Steps) -> int:
    """The length of a time domain when its root has T steps ('x/2' halves it)."""
    root = dom.split("/")[0]
    n = T if isinstance(T, int) else T.get(root, max(T.values(), default=1))
    return n >> dom.count("/")


def data_steps(arrays: dict, table: dict) -> dict[str, int]:
    """Each time domain's length in a batch of arrays (a compiled model's INPUTS table)."""
    return {dom: arrays[k].shape[0] for k, (_, dom, _) in table.items()
            if dom != "static" and k in arrays and "/" not in dom}  # fmt: skip


def value_bytes(d: dict, T: Steps, B: int, itemsize: int, rows: int | None = None) -> int:
    """One node's value: [rows, B, *shape], [B, *shape] or [*shape] elements."""
    count = math.prod(d["shape"] or ())
    if d.get("pair"):  # a value per step s of another sequence: [S, B, ...] per step or sequence
        count *= steps_of(d["pair"], T)
    if d["level"] == GLOBAL:
        return count * itemsize
    if d["level"] == STATIC:
        return count * B * itemsize
    return count * B * itemsize * (steps_of(d["level"], T) if rows is None else rows)


VIEWS = ("slice", "slice_rows")  # NumPy views: no memory of their own


def plan_bytes(plan: Plan, T: Steps, B: int, itemsize: int) -> int:
    """The peak of what a plan's function holds, walking its steps as the generated code runs
    them: each array made (a value computed once over all steps, or every kept step of a
    loop value, with its padding rows), each freed where the code frees it; views are free."""
    from .lower import Emitter, Namer  # the emitter's memory plan, not a second copy of it

    g = plan.graph
    em = Emitter(plan, Namer(g), g.graph.get("env", {}))
    dead = em.dead_before()

    def size(n: int, step) -> int:
        d = g.nodes[n]
        if OPS[d["op"]].kind == "leaf" or n in plan.views or n in em.inline or d["op"] in VIEWS:
            return 0
        if isinstance(step, Loop) and (n not in plan.stored or n in em.running):
            return value_bytes(d, T, B, itemsize, rows=1)  # one step's value, then dropped
        if d["level"] in (GLOBAL, STATIC):
            return value_bytes(d, T, B, itemsize)
        past, future = plan.pads.get(n, (0, 0))
        return value_bytes(d, T, B, itemsize, steps_of(d["level"], T) + past + future)

    held: dict[int, int] = {}
    peak = 0
    for i, step in enumerate(plan.steps):
        for n in dead.get(i, ()):
            held.pop(n, None)
        nodes = [step.node] if isinstance(step, Once) else step.nodes
        for n in nodes:
            held[n] = size(n, step)
        peak = max(peak, sum(held.values()))
    return peak


def estimate(m, T: Steps, B: int, dtype=np.float32, training: bool = True,
             window: int | None = None) -> Estimate:  # fmt: skip
    """The peak bytes of one forward pass (training=False) or one training step of model `m`
    on a batch of B sequences of T steps; `window`: a training step checkpointed over time in
    windows of that many steps (rnnc.remat), which holds one window's activations and the
    state each window starts from."""
    itemsize = np.dtype(dtype).itemsize
    g = m.graph
    n_params = sum(math.prod(g.nodes[n]["shape"] or ()) for n in g.graph["params"].values())
    name = "loss_and_grads" if training and "loss_and_grads" in m.plans else "forward"
    plan = m.plans[name]
    data = sum(value_bytes(plan.graph.nodes[n], T, B, itemsize) for n in plan.graph.nodes
               if plan.graph.nodes[n]["op"] in ("input", "target"))  # fmt: skip
    if window is None or not training:
        activations = plan_bytes(plan, T, B, itemsize)
    else:
        n = max(1, -(-max_steps(T) // window))  # windows: each one's starting state is kept
        activations = (plan_bytes(plan, min(window, max_steps(T)), B, itemsize)
                       + n * state_bytes(g, B, itemsize) + n_params * itemsize)  # and the gradients' sum  # fmt: skip
    return Estimate(
        params=n_params * itemsize,  # their gradients are values of the plan
        optimizer=n_params * itemsize * 2 if training else 0,
        activations=activations,
        data=data,
    )


def max_steps(T: Steps) -> int:
    return T if isinstance(T, int) else max(T.values(), default=1)


def state_bytes(g, B: int, itemsize: int) -> int:
    """One time step's carried states (what a window starts from)."""
    return sum(value_bytes(g.nodes[n], 1, B, itemsize, rows=1) for n in g.nodes
               if init_of(g, n) is not None and g.nodes[n]["level"] not in (GLOBAL, STATIC))  # fmt: skip


def have_bytes() -> int | None:
    """What a run may count on: RNNC_MEMORY_LIMIT (bytes) if set, else what the machine has free."""
    limit = os.environ.get("RNNC_MEMORY_LIMIT")
    return int(limit) if limit and limit.isdigit() else available_bytes()


def fits(need: int, have: int | None) -> bool:
    """`need` bytes fit in `have` (have_bytes(); None: unknown, so yes)."""
    return have is None or need <= SHARE * have


def available_bytes() -> int | None:
    """Memory this process can still take: the machine's available memory, or its container's
    (cgroup) limit less what the container uses, whichever is smaller; None if unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append(int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return max(min(found), 0) if found else None


def require_memory(need: int, what: str, hint: str | None = None) -> None:
    """Refuse, with both figures, a run that needs more than this machine has free.
    RNNC_MEMORY_LIMIT (bytes) overrides what the machine reports."""
    have = have_bytes()
    if fits(need, have):
        return
    raise RnncError(
        f"{what} needs about {fmt_bytes(need)}, and this machine has {fmt_bytes(have)} free",
        hint=hint or "lower --batch, the sequence length or the dims (--dim)",
        code="E550",
    )
