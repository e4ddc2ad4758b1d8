"""Training as a library: optimizers (Adam, AdamW, SGD with momentum) and schedules as objects,
data sources (built-in tasks, arrays, any iterator of batches), global-norm clipping, atomic
checkpoints with exact resume, JSON-lines metrics, a progress bar, callbacks, and data-parallel
training over MPI (one Allreduce of one flat buffer per step). `rnnc run --train` is a thin
layer over `Trainer`; so is a user's own loop:

    m = rnnc.compile("specs/lstm.rnn", dims={"H": 64})
    data = rnnc.train.Arrays(m, inputs, targets, batch=32)
    history = rnnc.train.Trainer(m, data, rnnc.train.Adam(lr=3e-3), steps=500).fit()
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from . import tasks
from .compiler import Model
from .data import check_data
from .decode import decode
from .errors import RnncError, UsageError
from .files import atomic_write, load_arrays, on_host, save_arrays
from .memory import estimate, require_memory
from .parallel import Single, sharded
from .remat import choose_window, reason_not_windowable

Batch = tuple[dict, dict, dict | None]  # inputs, targets, lengths


@dataclass
class State:
    """Everything a checkpoint holds: a resumed run continues exactly where this one was."""

    params: dict[str, np.ndarray]
    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]
    step: int = 0
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    offset: int = 0  # position in a text stream (truncated BPTT)
    carry: dict[str, np.ndarray] | None = None  # the whole batch's, on every rank

    def on(self, xp) -> State:
        """The same state with its arrays in `xp`'s memory (cupy: on the device)."""
        move = lambda d: None if d is None else {k: xp.asarray(v) for k, v in d.items()}  # noqa: E731
        return State(move(self.params), move(self.m), move(self.v), self.step, self.rng,
                     self.offset, move(self.carry))  # fmt: skip


# ----- optimizers and schedules -----


@dataclass
class Adam:
    """Adam (Kingma & Ba 2015) with bias correction; weight_decay > 0 makes it AdamW
    (Loshchilov & Hutter 2019: the decay is applied to the weights, not the gradient)."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    @property
    def name(self) -> str:
        return "adamw" if self.weight_decay else "adam"

    def update(self, s: State, grads: dict, lr: float) -> None:
        """One step on s.params in place (s.step counts it; m and v are the moments)."""
        s.step += 1
        for k, p in s.params.items():
            g = grads[k].astype(p.dtype)
            if self.weight_decay:
                p -= (lr * self.weight_decay) * p
            s.m[k] = self.beta1 * s.m[k] + (1 - self.beta1) * g
            s.v[k] = self.beta2 * s.v[k] + (1 - self.beta2) * g * g
            mh = s.m[k] / (1 - self.beta1**s.step)
            vh = s.v[k] / (1 - self.beta2**s.step)
            p -= (lr * mh / (np.sqrt(vh) + self.eps)).astype(p.dtype)


@dataclass
class SGD:
    """SGD with (heavy-ball) momentum; m holds the velocity."""

    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    name: str = "sgd"

    def update(self, s: State, grads: dict, lr: float) -> None:
        s.step += 1
        for k, p in s.params.items():
            g = grads[k].astype(p.dtype)
            if self.weight_decay:
                g = g + self.weight_decay * p
            s.m[k] = self.momentum * s.m[k] + g
            p -= lr * s.m[k]


def constant(step: int, total: int) -> float:
    """The learning rate's factor at `step` of `total`: 1 throughout."""
    return 1.0


def cosine(step: int, total: int) -> float:
    """Half a cosine from 1 down to 0 over the run."""
    return 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def step_decay(step: int, total: int) -> float:
    """0.1 times less after each third of the run."""
    return 0.1 ** (step // max(total // 3, 1))


SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": constant, "cosine": cosine, "step": step_decay,
}  # fmt: skip


def clip(grads: dict[str, np.ndarray], limit: float) -> float:
    """Scale all gradients together so their global norm is at most `limit`; return the norm."""
    # summed where the gradients are (host or device), read back once
    norm = math.sqrt(float(sum((g.astype(np.float64) ** 2).sum() for g in grads.values())))
    if limit > 0 and norm > limit:
        for k in grads:
            grads[k] = grads[k] * (limit / norm)
    return norm


# ----- checkpoints -----

# the settings a checkpoint records; resuming with other values is refused unless overridden
SETTINGS = ("task", "optimizer", "lr", "batch", "seq_len", "schedule", "momentum", "weight_decay",
            "clip", "float64")  # fmt: skip


def save_checkpoint(path: str, s: State, meta: dict) -> None:
    from . import __version__

    arrays = {f"param/{k}": v for k, v in s.params.items()}
    arrays.update({f"opt.m/{k}": v for k, v in s.m.items()})
    arrays.update({f"opt.v/{k}": v for k, v in s.v.items()})
    for k, v in (s.carry or {}).items():
        arrays[f"carry/{k}"] = v
    info = {**meta, "rnnc": __version__, "step": s.step, "offset": s.offset,
            "rng": s.rng.bit_generator.state}  # fmt: skip
    arrays["meta"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
    save_arrays(path, arrays)


def checkpoint_meta(arrays: dict, path: str) -> dict:
    """A checkpoint's metadata: a JSON object stored as bytes under 'meta'."""
    raw = arrays.get("meta")
    if raw is None:
        raise RnncError(f"{path} is not an rnnc checkpoint (no 'meta')", code="E521")
    try:
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError
        info = json.loads(raw.tobytes().decode())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RnncError(f"{path}: its metadata ('meta') is corrupt", code="E521") from None
    if not isinstance(info, dict):
        raise RnncError(f"{path}: its metadata is a JSON {type(info).__name__}, not an object",
                        code="E521")  # fmt: skip
    return info


def meta_field(info: dict, key: str, path: str, kind, default=None, ok=lambda v: True):
    """info[key], of type `kind` and passing `ok`, or a worded refusal naming the field."""
    v = info.get(key, default)
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool) or not ok(v):
        raise RnncError(f"{path}: its metadata field '{key}' is {json.dumps(v)[:60]}, "
                        "which no rnnc run writes", hint="the file is damaged", code="E521")  # fmt: skip
    return v


def charset(v: list) -> bool:
    """A text run's characters: distinct, each one character."""
    return 0 < len(v) == len({c for c in v if isinstance(c, str) and len(c) == 1})


def carry_shapes(m: Model) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The states a text run carries between windows: name -> (rows, feature shape)."""
    from .graph import init_of

    plan = m.plans["loss_and_grads"]
    g = plan.graph
    return {g.nodes[n]["name"]: (past, tuple(g.nodes[n]["shape"]))
            for n, (past, _) in plan.pads.items()
            if past and init_of(g, n) is not None and "adjoint_of" not in g.nodes[n]}  # fmt: skip


def load_checkpoint(path: str, m: Model, dtype, meta: dict, settings: dict | None = None,
                    override: bool = False) -> State:  # fmt: skip
    """A checkpoint checked field by field against the model (and, given `settings`, against
    this run's settings: a difference is refused by name unless `override`)."""
    from .data import check_params

    arrays = load_arrays(path, "checkpoint")
    info = checkpoint_meta(arrays, path)
    if info.get("model") != meta["model"]:
        raise RnncError(f"{path} was saved for model '{str(info.get('model'))[:60]}', "
                        f"not '{meta['model']}'", code="E521")  # fmt: skip
    step = meta_field(info, "step", path, int, ok=lambda v: v >= 0)
    offset = meta_field(info, "offset", path, int, 0, ok=lambda v: v >= 0)
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = meta_field(info, "rng", path, dict)
    except (TypeError, ValueError, KeyError, OverflowError):
        raise RnncError(f"{path}: its metadata field 'rng' is not a PCG64 generator state",
                        hint="the file is damaged", code="E521") from None  # fmt: skip
    if "chars" in meta:
        chars = meta_field(info, "chars", path, list, ok=charset)
        if chars != meta["chars"]:
            raise RnncError(f"{path} was trained on another text ({len(chars)} distinct "
                            f"characters, this one has {len(meta['chars'])})", code="E521")  # fmt: skip
    params = check_params(arrays, m, path, dtype, ("param/",))
    mm = check_params(arrays, m, path, dtype, ("opt.m/",))
    vv = check_params(arrays, m, path, dtype, ("opt.v/",))
    for k, v in vv.items():
        if (v < 0).any():
            raise RnncError(f"{path}: 'opt.v/{k}' (Adam's second moment) holds negative values",
                            hint="the file is damaged", code="E521")  # fmt: skip
    unknown = sorted(k.split("/", 1)[1] for k in arrays
                     if k.startswith("param/") and k.split("/", 1)[1] not in m.params)  # fmt: skip
    if unknown:
        raise RnncError(
            f"{path}: parameters the spec does not have: {', '.join(unknown)}", code="E521"
        )
    carry = load_carry(arrays, m, path, dtype, settings)
    if settings is not None:
        changed = changed_settings(info.get("settings"), settings)
        if changed and not override:
            raise RnncError(
                f"{path} was trained with {changed[0]}",
                hint="resume with the same settings, or add --override to continue with the new ones",
                code="E522",
            )
        if carry is not None and any(v.shape[1] != settings["batch"] for v in carry.values()):
            carry, offset = None, 0  # another batch: the text streams start again
    return State(params, mm, vv, step, rng, offset, carry)


def changed_settings(saved, now: dict) -> list[str]:
    """'--lr 0.003, this run --lr 0.01' for each recorded setting this run changes."""
    if not isinstance(saved, dict):
        return []  # a checkpoint from before settings were recorded
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    return [f"{flag(k)} {saved[k]}, and this run has {flag(k)} {now.get(k)}"
            for k in SETTINGS if k in saved and saved[k] != now.get(k)]  # fmt: skip


def load_carry(arrays: dict, m: Model, path: str, dtype, settings: dict | None):
    from .data import real_values

    found = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("carry/")}
    if not found:
        return None
    want = carry_shapes(m) if "loss_and_grads" in m.plans else {}
    out = {}
    for k, v in found.items():
        if k not in want:
            raise RnncError(f"{path}: 'carry/{k}' is no state this model carries", code="E521")
        rows, shape = want[k]
        if v.ndim != 2 + len(shape) or v.shape[0] != rows or tuple(v.shape[2:]) != shape:
            raise RnncError(f"{path}: 'carry/{k}' is {list(v.shape)}, the model's state is "
                            f"[{rows}, batch, {', '.join(map(str, shape))}]", code="E521")  # fmt: skip
        out[k] = real_values(v, f"carry/{k}", path, dtype).astype(dtype)
    return out


# ----- data -----


class Task:
    """A built-in task (adding, copy, reber, reverse, text): fresh batches from the run's generator."""

    DEFAULTS: ClassVar[dict[str, tuple[int, int, float]]] = {  # task: (T, steps, learning rate)
        "adding": (50, 1200, 1e-2), "copy": (20, 2000, 3e-3), "reber": (0, 1500, 1e-2),
        "text": (64, 600, 3e-3), "reverse": (12, 3000, 3e-3),
    }  # fmt: skip
    REBER_STEPS = 60  # embedded Reber strings are rarely longer (the memory estimate's length)

    def __init__(self, name: str, batch: int = 32, seq_len: int | None = None,
                 text: str | None = None):  # fmt: skip
        if name not in self.DEFAULTS:
            raise UsageError(f"no task '{name}': adding, copy, reber, reverse or text", code="E501")
        self.name, self.B = name, batch
        self.T = seq_len or self.DEFAULTS[name][0]
        self.text = None
        if name == "text":
            self.text = tasks.Text(text if text is not None else tasks.default_text())
            need = text_needs(self.T, self.B)
            if len(self.text.ids) < need:
                raise UsageError(
                    f"the text has {len(self.text.ids):,d} characters; --seq-len {self.T} at "
                    f"--batch {self.B} needs at least {need:,d} (95% to train on, 5% to validate)",
                    hint="a longer text, or a smaller --seq-len or --batch",
                    code="E501",
                )

    def dims(self) -> dict[str, int]:
        """Dims the task fixes: the vocabulary of the text, the symbols of copy and Reber."""
        return {"text": {"V": self.text.vocab} if self.text else {}, "copy": {"V": tasks.COPY_SYMBOLS + 2},
                "reber": {"V": len(tasks.REBER)},
                "reverse": {"S": tasks.DIGITS + 2, "V": tasks.DIGITS + 2}}.get(self.name, {})  # fmt: skip

    def longest(self) -> int:
        return {"reber": self.REBER_STEPS, "reverse": self.T + 1}.get(self.name, self.T)

    def batch(self, rng, s: State | None = None) -> Batch:
        if self.name == "adding":
            return tasks.adding_batch(rng, self.T, self.B)
        if self.name == "copy":
            return tasks.copy_batch(rng, self.T, self.B)
        if self.name == "reber":
            ins, tgs, L = tasks.reber_batch(rng, self.B)
            return ins, tgs, {"x": L}
        if self.name == "reverse":
            return tasks.reverse_batch(rng, self.T, self.B)
        return self.text_batch(rng, s)

    def validation(self, rng) -> Batch:
        return self.batch(rng, None)

    def text_batch(self, rng, s: State | None) -> Batch:
        assert self.text is not None
        ids, T, B = self.text.ids, self.T, self.B
        if s is None:  # validation: the last 5% of the text
            start = int(len(ids) * 0.95)
            idx = (
                start
                + rng.integers(0, max(len(ids) - start - T - 1, 1), B)[None, :]
                + np.arange(T)[:, None]
            )
        else:  # training: B parallel streams over the first 95%, read T characters at a time
            n = int(len(ids) * 0.95) // B
            if s.offset + T + 1 >= n:
                s.offset, s.carry = 0, None
            idx = np.arange(B)[None, :] * n + s.offset + np.arange(T)[:, None]
            s.offset += T
        return {"x": np.eye(self.text.vocab)[ids[idx]]}, {"y": ids[idx + 1]}, None


def text_needs(T: int, B: int) -> int:
    """The fewest characters that give B training streams and a validation window of T + 1."""
    n = T + 2
    while int(n * 0.95) // B < T + 2 or n - int(n * 0.95) < T + 2:
        n = max(n + 1, int(n * 1.05))
    return n


class Arrays:
    """Batches drawn without replacement from arrays shaped like a data file's (checked
    against the model); `validation` is a fixed batch (by default a random one of them)."""

    name = "npz"

    def __init__(self, m: Model, inputs: dict, targets: dict, lengths: dict | None = None,
                 batch: int = 32, validation: Batch | None = None, dtype=np.float32,
                 source: str = "arrays"):  # fmt: skip
        arrays = {**inputs, **targets, **{f"{k}.lengths": v for k, v in (lengths or {}).items()}}
        self.inputs, self.targets, self.lengths = check_data(arrays, m, source, dtype)
        self.table = {**m.inputs, **m.targets}
        first = next(iter(self.inputs))
        self.n = self.inputs[first].shape[1 if self.table[first][1] != "static" else 0]
        self.B = min(batch, self.n)
        self.fixed = validation

    def longest(self) -> int:
        return max((v.shape[0] for k, v in self.inputs.items() if self.table[k][1] != "static"),
                   default=1)  # fmt: skip

    def batch(self, rng, s: State | None = None) -> Batch:
        idx = rng.choice(self.n, self.B, replace=False)
        pick = lambda d: {k: v[:, idx] if self.table[k][1] != "static" else v[idx] for k, v in d.items()}  # noqa: E731
        L = {k: v[idx] for k, v in self.lengths.items()} if self.lengths else None
        return pick(self.inputs), pick(self.targets), L

    def validation(self, rng) -> Batch:
        return self.fixed if self.fixed is not None else self.batch(rng)


class Batches:
    """Any iterable of (inputs, targets, lengths or None) batches, used in order; the
    validation batch is given or the first one. A run needs as many batches as steps."""

    name = "batches"

    def __init__(self, batches: Iterable[Batch], validation: Batch | None = None):
        self.it: Iterator[Batch] = iter(batches)
        self.first = validation if validation is not None else next(self.it, None)
        if self.first is None:
            raise RnncError("the iterable of batches is empty", code="E530")
        self.pending = [] if validation is not None else [self.first]
        ins = self.first[0]
        arr = next(iter(ins.values()))
        self.B = arr.shape[1] if arr.ndim >= 2 else arr.shape[0]

    def longest(self) -> int:
        return max((v.shape[0] for v in self.first[0].values() if v.ndim >= 2), default=1)

    def batch(self, rng, s: State | None = None) -> Batch:
        if self.pending:
            return self.pending.pop()
        b = next(self.it, None)
        if b is None:
            raise RnncError("the batches ran out before the last step", code="E530")
        return b

    def validation(self, rng) -> Batch:
        return self.first


def check_fits(m: Model, batch: Batch, source: str) -> None:
    """The model accepts the source's batches (inputs and targets of the right names and shapes)."""
    ins, tgs, _ = batch
    try:
        check_data({**ins, **tgs}, m, f"{source}")
    except RnncError as e:
        raise RnncError(
            f"this spec does not fit the {source} task: {e.message}",
            hint=f"the task gives inputs {fmt_table(ins)} and targets {fmt_table(tgs)}",
            code="E532",
        ) from None


def fmt_table(arrays) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in arrays.items())


# ----- the loop -----


@dataclass
class Record:
    """One step's metrics, as the JSON-lines log writes them."""

    step: int
    loss: float | None
    val_loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None


class Trainer:
    """Trains a compiled model: `fit()` runs until `steps` (or a stop request) and returns the
    history of Records. `comm`: an MPI communicator for data-parallel training (each rank
    computes its shard of every batch; rank 0 alone writes checkpoints, logs and the bar)."""

    def __init__(self, model: Model, data, optimizer: Adam | SGD | None = None, *,
                 steps: int = 1000, schedule: str | Callable[[int, int], float] = "constant",
                 clip: float = 1.0, seed: int = 0, dtype=np.float32, params: dict | None = None,
                 checkpoint: str | None = None, checkpoint_every: int = 100,
                 resume: bool = False, override: bool = False, log: str | None = None,
                 progress: bool = False, validate_every: int = 50,
                 callbacks: Iterable[Callable[[Trainer, Record], Any]] = (), comm=None,
                 remat: int | str | None = None):  # fmt: skip
        self.m, self.data = model, data
        self.opt = optimizer or Adam()
        self.steps, self.clip, self.dtype = steps, clip, dtype
        self.schedule_name = schedule if isinstance(schedule, str) else getattr(schedule, "__name__", "custom")
        self.schedule = SCHEDULES[schedule] if isinstance(schedule, str) else schedule
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.log, self.bar_on, self.validate_every = log, progress, validate_every
        self.callbacks = list(callbacks)
        self.comm = comm if comm is not None else Single()
        if self.comm.size > data.B:
            raise RnncError(f"a batch of {data.B} cannot be shared by {self.comm.size} processes",
                            hint="a batch at least as large as the number of processes",
                            code="E561")  # fmt: skip
        self.stop = False  # a callback may set it
        self.signal = 0
        if model.grad_graph is None:
            from .check import require_loss

            require_loss(model.graph)
        # checkpointing over time (remat): steps per window, or None for plain BPTT
        self.window = choose_window(model, remat, data.longest(), data.B, dtype)
        require_memory(estimate(model, data.longest(), data.B, dtype, training=True, window=self.window).total,
                       f"training {model.graph.graph['model']} at batch {data.B} over {data.longest():,d} steps",
                       hint=None if self.window or reason_not_windowable(model.graph) else
                       "lower --batch, the sequence length or the dims (--dim), or checkpoint over time "
                       "(--remat auto)")  # fmt: skip
        self.meta = {"model": model.graph.graph["model"], "task": data.name,
                     "settings": self.settings()}  # fmt: skip
        if getattr(data, "text", None) is not None:
            self.meta["chars"] = data.text.chars
        if resume:
            if not checkpoint or not os.path.exists(checkpoint):
                raise UsageError("resuming needs an existing checkpoint file", code="E501")
            self.s = load_checkpoint(checkpoint, model, dtype, self.meta, self.meta["settings"],
                                     override).on(model.xp)  # fmt: skip
        else:
            p = params if params is not None else model.init_params(seed, dtype)
            p = {k: model.xp.asarray(np.asarray(on_host(v), dtype)) for k, v in p.items()}
            zeros = lambda: {k: model.xp.zeros_like(v) for k, v in p.items()}  # noqa: E731
            self.s = State(p, zeros(), zeros(), 0, np.random.default_rng(seed))
        self.val = data.validation(np.random.default_rng(10_000 + seed))
        check_fits(model, self.val, data.name)
        self.tbptt = getattr(data, "text", None) is not None

    def settings(self) -> dict:
        out = {"task": self.data.name, "optimizer": self.opt.name, "lr": self.opt.lr,
               "batch": self.data.B, "seq_len": getattr(self.data, "T", None),
               "schedule": self.schedule_name, "clip": self.clip,
               "float64": np.dtype(self.dtype) == np.float64}  # fmt: skip
        if isinstance(self.opt, SGD):
            out["momentum"] = self.opt.momentum
        if self.opt.weight_decay:
            out["weight_decay"] = self.opt.weight_decay
        return out

    @property
    def params(self) -> dict:
        return self.s.params

    @property
    def lead(self) -> bool:
        """This process writes files and prints (rank 0, or the only process)."""
        return self.comm.rank == 0

    def validate(self) -> float:
        vi, vt, vl = self.val
        ins = {k: np.asarray(v).astype(self.dtype) for k, v in vi.items()}
        return float(self.m.loss(self.s.params, ins, vt, lengths=vl)["loss"])

    def save(self) -> None:
        if self.checkpoint and self.lead:
            save_checkpoint(self.checkpoint, self.s, self.meta)

    def step(self) -> Record:
        """One update on the next batch: this rank's shard, gradients summed over ranks."""
        s, m = self.s, self.m
        ins, tgs, L = self.data.batch(s.rng, s)
        B = batch_of(ins, m.inputs)
        n_tok = int(L[next(iter(L))].sum()) if L else np.shape(next(iter(ins.values())))[0] * B
        # dropout and zoneout masks for the whole batch, from the run's generator (so that a
        # resumed run and any number of processes draw the same ones), then shared out
        ins = {**ins, **m.draw_masks(ins, s.rng)}
        masks = {k: (shape, dom, False) for k, (shape, dom, _, _) in m.masks.items()}
        ins, tgs, L, share, rows = sharded(ins, tgs, L, {**m.inputs, **m.targets, **masks}, self.comm)
        ins = {k: np.asarray(v).astype(self.dtype) for k, v in ins.items()}
        if self.tbptt:
            carry = None if s.carry is None else {k: v[:, rows] for k, v in s.carry.items()}
            loss, grads, carry = m.loss_and_grads(s.params, ins, tgs, lengths=L, carry=carry,
                                                  return_carry=True, remat=self.window)  # fmt: skip
            s.carry = self.comm.gather_rows({k: v.copy() for k, v in carry.items()}, B)
        else:
            loss, grads = m.loss_and_grads(s.params, ins, tgs, lengths=L, remat=self.window)
        grads = {k: grads[k] * share for k in s.params}  # this shard's part of the batch mean
        loss, stop = self.comm.sum_grads(grads, float(loss) * share, float(bool(self.signal or self.stop)))
        if stop:
            self.stop = True
        if not np.isfinite(loss):
            raise RnncError(f"the loss became {loss} at step {s.step}",
                            hint="lower the learning rate, or keep clipping on (default 1.0)",
                            code="E540")  # fmt: skip
        norm = clip(grads, self.clip)
        lr = self.opt.lr * self.schedule(s.step, self.steps)
        self.opt.update(s, grads, lr)
        self.tokens += n_tok
        return Record(s.step, loss, grad_norm=norm, lr=lr)

    def fit(self) -> list[Record]:
        """Train to `steps`; on SIGINT/SIGTERM stop after the step in progress and save."""
        history: list[Record] = []
        log = open(self.log, "a", encoding="utf-8") if self.log and self.lead else None  # noqa: SIM115
        bar = progress_bar(self.steps, self.s.step) if self.bar_on and self.lead else None
        t0, self.tokens = time.perf_counter(), 0
        if self.s.step == 0:
            first = self.validate() if self.lead else None
            history.append(Record(0, None, first))
            if log:
                log.write(json.dumps({"step": 0, "loss": None, "val_loss": first}) + "\n")
        try:
            with stop_requests(self):
                while self.s.step < self.steps and not self.stop:
                    r = self.step()
                    if self.lead and (r.step % self.validate_every == 0 or r.step == self.steps):
                        r.val_loss = self.validate()
                    r.tokens_per_s = self.tokens / max(time.perf_counter() - t0, 1e-9)
                    history.append(r)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{r.loss:.4f}", tok_s=f"{r.tokens_per_s:,.0f}",
                                        val=f"{r.val_loss:.4f}" if r.val_loss is not None else None)  # fmt: skip
                    if log:
                        log.write(json.dumps(vars(r)) + "\n")
                    for cb in self.callbacks:
                        cb(self, r)
                    if r.step % self.checkpoint_every == 0 or r.step == self.steps:
                        self.save()
        except BaseException as e:
            if self.comm.size > 1:  # the other ranks would wait in the next Allreduce forever
                print(f"rnnc: process {self.comm.rank} of {self.comm.size} failed "
                      f"({type(e).__name__}: {e}); stopping all of them", file=sys.stderr)  # fmt: skip
                sys.stderr.flush()
                time.sleep(1.0)  # the launcher forwards our stderr on its own time; Abort kills that
                self.comm.abort(1)
            raise
        finally:
            if bar is not None:
                bar.close()
            if log:
                log.close()
        self.seconds = time.perf_counter() - t0
        if self.stop and self.s.step % self.checkpoint_every:
            self.save()  # the step it stopped after
        return history


def batch_of(ins: dict, table: dict) -> int:
    k, v = next(iter(ins.items()))
    return np.shape(v)[1 if table[k][1] != "static" else 0]


class Stopper:
    """The first SIGINT or SIGTERM asks the run to stop after the step in progress; a second
    SIGINT stops at once."""

    def __init__(self, trainer: Trainer):
        self.t = trainer

    def __call__(self, signum, frame) -> None:
        if self.t.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.t.signal = signum
        if self.t.lead:
            print(f"\nrnnc: {signal.Signals(signum).name}: stopping after this step "
                  "(Ctrl-C again to stop now, saving nothing)", file=sys.stderr)  # fmt: skip


@contextlib.contextmanager
def stop_requests(trainer: Trainer):
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; elsewhere the caller's apply
        return
    handler = Stopper(trainer)
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def progress_bar(total: int, start: int):
    if not sys.stderr.isatty() and os.environ.get("RNNC_PROGRESS") != "1":
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def require_matplotlib():
    """pyplot with the headless Agg backend, or a worded error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RnncError(
            "--plot needs matplotlib, which is not installed",
            hint='pip install "rnnc[plot]"',
            code="E541",
        ) from None
    return plt


def plot(history: list[Record], path: str) -> None:
    """Training and validation loss against the step, as a PNG (atomically)."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r.step, r.loss) for r in history if r.loss is not None]
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.6, label="training")
    vs = [(r.step, r.val_loss) for r in history if r.val_loss is not None]
    if vs:
        ax.plot(*zip(*vs, strict=True), lw=2, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write(path, buf.getvalue())


# ----- generation -----


def generate(m: Model, params: dict, chars: list[str], n: int, prime: str = "",
             temperature: float = 1.0, seed: int = 0, method: str = "sample", top_k: int | None = None,
             width: int = 4, end: str | None = None, alpha: float = 0.0) -> str:  # fmt: skip
    """n characters from a character model through its `generate` rule (rnnc.decode)."""
    index = {c: i for i, c in enumerate(chars)}
    start = [index[c] for c in (prime or ("\n" if "\n" in index else chars[-1]))]
    out = decode(m, params, n, [start], method=method, temperature=temperature, top_k=top_k,
                 width=width, end=None if end is None else index[end], alpha=alpha, seed=seed)  # fmt: skip
    return prime + "".join(chars[i] if i else "?" for i in out.tokens[0])
