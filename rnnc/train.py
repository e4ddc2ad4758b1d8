"""Training (`rnnc run SPEC --train`): batches from a built-in task or an .npz, Adam or SGD
with momentum, a learning-rate schedule, global-norm clipping, truncated BPTT over streams,
atomic checkpoints with exact resume, a progress bar, a JSON-lines log and a loss plot."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import tasks
from .compiler import Model, compile_spec, parse_dims
from .data import check_data, load_params
from .errors import RnncError, UsageError
from .files import atomic_write, load_npz, on_host, save_npz
from .memory import estimate, require_memory

REBER_STEPS = 60  # embedded Reber strings are rarely longer (the memory estimate's length)
DEFAULTS = {  # task: (sequence length, steps, learning rate, batch)
    "adding": (50, 1200, 1e-2, 64),
    "copy": (20, 2000, 3e-3, 32),
    "reber": (0, 1500, 1e-2, 32),
    "text": (64, 600, 3e-3, 32),
    "npz": (0, 500, 1e-3, 32),
}


@dataclass
class State:
    """Everything a checkpoint holds: a resumed run continues exactly where this one was."""

    params: dict[str, np.ndarray]
    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]
    step: int = 0
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    offset: int = 0  # position in a text stream (truncated BPTT)
    carry: dict[str, np.ndarray] | None = None

    def on(self, xp) -> State:
        """The same state with its arrays in `xp`'s memory (cupy: on the device)."""
        move = lambda d: None if d is None else {k: xp.asarray(v) for k, v in d.items()}  # noqa: E731
        return State(move(self.params), move(self.m), move(self.v), self.step, self.rng,
                     self.offset, move(self.carry))  # fmt: skip


def lr_at(a, step: int, total: int) -> float:
    if a.schedule == "cosine":
        return a.lr * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    if a.schedule == "step":
        return a.lr * (0.1 ** (step // max(total // 3, 1)))
    return a.lr


def clip(grads: dict[str, np.ndarray], limit: float) -> float:
    """Scale all gradients together so their global norm is at most `limit`; return the norm."""
    # summed where the gradients are (host or device), read back once
    norm = math.sqrt(float(sum((g.astype(np.float64) ** 2).sum() for g in grads.values())))
    if limit > 0 and norm > limit:
        for k in grads:
            grads[k] = grads[k] * (limit / norm)
    return norm


def update(s: State, grads: dict[str, np.ndarray], lr: float, a) -> None:
    s.step += 1
    for k, p in s.params.items():
        g = grads[k].astype(p.dtype)
        if a.optimizer == "sgd":
            s.m[k] = a.momentum * s.m[k] + g
            p -= lr * s.m[k]
        else:  # Adam (Kingma & Ba 2015) with bias correction
            s.m[k] = 0.9 * s.m[k] + 0.1 * g
            s.v[k] = 0.999 * s.v[k] + 0.001 * g * g
            mh = s.m[k] / (1 - 0.9**s.step)
            vh = s.v[k] / (1 - 0.999**s.step)
            p -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(p.dtype)


# ----- checkpoints -----

# the settings a checkpoint records; resuming with other values is refused unless --override
SETTINGS = ("task", "optimizer", "lr", "batch", "seq_len", "schedule", "momentum", "clip", "float64")


def settings_of(a, src) -> dict:
    out = {"task": src.task, "optimizer": a.optimizer, "lr": a.lr, "batch": a.batch,
           "seq_len": src.T, "schedule": a.schedule, "clip": a.clip, "float64": bool(a.float64)}  # fmt: skip
    if a.optimizer == "sgd":
        out["momentum"] = a.momentum
    return out


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
    save_npz(path, arrays)


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

    arrays = load_npz(path, "checkpoint")
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


class Source:
    """Training and validation batches for one task, from the run's random generator."""

    def __init__(self, a, m: Model):
        self.m_inputs, self.m_targets = m.inputs, m.targets
        self.task = a.task or ("npz" if a.data else None)
        if self.task not in DEFAULTS:
            raise UsageError(
                "--train needs --task adding|copy|reber|text, or --data FILE.npz", code="E501"
            )
        T, _, _, _ = DEFAULTS[self.task]
        self.T = a.seq_len or T
        self.B = a.batch
        self.text = None
        if self.task == "text":
            raw = read_text(a.text) if a.text else tasks.default_text()
            self.text = tasks.Text(raw)
            need = text_needs(self.T, self.B)
            if len(self.text.ids) < need:
                raise UsageError(
                    f"--text {a.text} has {len(self.text.ids):,d} characters; --seq-len {self.T} "
                    f"at --batch {self.B} needs at least {need:,d} (95% to train on, 5% to validate)",
                    hint="a longer text, or a smaller --seq-len or --batch",
                    code="E501",
                )
        if self.task == "npz":
            if not a.data:
                raise UsageError("--task npz needs --data FILE.npz", code="E501")
            arrays = load_npz(a.data, "data file")
            dtype = np.float64 if a.float64 else np.float32
            self.inputs, self.targets, self.lengths = check_data(arrays, m, a.data, dtype)
            self.n = batch_size(self.inputs, m.inputs)

    def longest(self) -> int:
        """The most steps one batch will have (for the memory estimate)."""
        if self.task == "npz":
            return max((v.shape[0] for k, v in self.inputs.items() if self.m_inputs[k][1] != "static"),
                       default=1)  # fmt: skip
        return self.T if self.task != "reber" else REBER_STEPS

    def batch(self, rng, s: State | None = None):
        if self.task == "adding":
            return tasks.adding_batch(rng, self.T, self.B)
        if self.task == "copy":
            return tasks.copy_batch(rng, self.T, self.B)
        if self.task == "reber":
            ins, tgs, L = tasks.reber_batch(rng, self.B)
            return ins, tgs, {"x": L}
        if self.task == "text":
            return self.text_batch(rng, s)
        idx = rng.choice(self.n, min(self.B, self.n), replace=False)
        pick = lambda d, t: {k: v[:, idx] if t[k][1] != "static" else v[idx] for k, v in d.items()}  # noqa: E731
        L = {k: v[idx] for k, v in self.lengths.items()} if self.lengths else None
        return pick(self.inputs, self.m_inputs), pick(self.targets, self.m_targets), L

    def text_batch(self, rng, s: State | None):
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


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise RnncError(f"cannot read {path}: {e.strerror or e}", code="E500") from None
    if not text:
        raise UsageError(f"--text {path} is empty", code="E501")
    return text


def batch_size(arrays, table) -> int:
    k, v = next(iter(arrays.items()))
    return v.shape[1] if table[k][1] != "static" else v.shape[0]


def task_dims(a, m_probe: Model | None = None) -> dict[str, int]:
    """Dims a task fixes (the vocabulary of the text, the symbols of copy and Reber)."""
    if a.task == "text":
        raw = read_text(a.text) if a.text else tasks.default_text()
        return {"V": tasks.Text(raw).vocab}
    if a.task == "copy":
        return {"V": tasks.COPY_SYMBOLS + 2}
    if a.task == "reber":
        return {"V": len(tasks.REBER)}
    return {}


# ----- the loop -----


def run_training(a) -> int:
    if a.generate is not None:
        return run_generate(a)
    if a.plot:
        require_matplotlib()  # before the run, not after it
    if a.resume and a.params:
        raise UsageError("--resume continues a checkpoint; --params starts from a params file: "
                         "give one of them", code="E501")  # fmt: skip
    if a.resume and (not a.checkpoint or not os.path.exists(a.checkpoint)):
        raise UsageError("--resume needs an existing --checkpoint file", code="E501")
    dims = {**task_dims(a), **parse_dims(a.dim)}
    m = compile_spec(a.spec, dims=dims, model=a.model, target=a.target)
    if m.grad_graph is None:
        from .check import require_loss

        require_loss(m.graph)
    src = Source(a, m)
    _, steps0, lr0, _ = DEFAULTS[src.task]
    a.steps = a.steps or steps0
    a.lr = a.lr or lr0
    dtype = np.float64 if a.float64 else np.float32
    require_memory(estimate(m, src.longest(), src.B, dtype, training=True).total,
                   f"training {m.graph.graph['model']} at --batch {src.B} over {src.longest():,d} steps")  # fmt: skip
    if not a.output and not a.checkpoint:
        print("rnnc: note: the trained parameters are not saved; add -o params.npz "
              "(or --checkpoint ck.npz) to keep them", file=sys.stderr)  # fmt: skip
    meta = {"model": m.graph.graph["model"], "task": src.task, "settings": settings_of(a, src)}
    if src.text is not None:
        meta["chars"] = src.text.chars
    if a.resume:
        s = load_checkpoint(a.checkpoint, m, dtype, meta, meta["settings"], a.override).on(m.xp)
    else:
        params = load_params(a.params, m, dtype) if a.params else m.init_params(a.seed, dtype)
        params = {k: m.xp.asarray(v) for k, v in params.items()}  # on the device for cupy
        zeros = lambda: {k: m.xp.zeros_like(v) for k, v in params.items()}  # noqa: E731
        s = State(params, zeros(), zeros(), 0, np.random.default_rng(a.seed))
    val_rng = np.random.default_rng(10_000 + a.seed)
    val = src.batch(val_rng, None)
    check_batch(m, val, src.task)
    with stop_requests() as stop:
        history, tokens, elapsed = train_loop(a, m, src, s, val, meta, dtype, stop)
    vals = [v for _, _, v in history if v is not None]
    final = vals[-1] if vals else float("nan")
    if stop.signal:
        print(f"rnnc: stopped by {signal.Signals(stop.signal).name} after step {s.step}",
              file=sys.stderr)  # fmt: skip
    else:
        print(f"trained {m.graph.graph['model']} on {src.task}: {s.step} steps in {elapsed:.1f}s, "
              f"{tokens / max(elapsed, 1e-9):,.0f} tokens/s; validation loss {final:.4f}")  # fmt: skip
        if src.task == "adding":
            print(f"  (predicting 1 always scores 0.167; this model scores {final:.4f})")
        if src.task == "text":
            print(f"  {final / src.T / math.log(2):.3f} bits per character on held-out text")
    if stop.signal and a.checkpoint:
        save_checkpoint(a.checkpoint, s, meta)
        print(f"wrote {a.checkpoint} (step {s.step}; continue with --resume)", file=sys.stderr)
    if a.plot and not stop.signal:
        plot(history, a.plot)
    if a.output:
        save_npz(a.output, {f"param/{k}": v for k, v in s.params.items()})
        print(f"wrote {a.output}", file=sys.stderr if stop.signal else sys.stdout)
    return 128 + stop.signal if stop.signal else 0


def train_loop(a, m: Model, src: Source, s: State, val, meta: dict, dtype, stop: Stop):
    """Steps until a.steps or a stop request (checked between steps, so the state is always
    that after a whole step); (history, tokens, seconds)."""
    tbptt = src.task == "text"
    log = open(a.log, "a", encoding="utf-8") if a.log else None  # noqa: SIM115
    history: list[tuple[int, float, float | None]] = []
    bar = progress(a, s.step)
    t_start, tokens = time.perf_counter(), 0

    def validate() -> float:
        vi, vt, vl = val
        ins = {k: v.astype(dtype) for k, v in vi.items()}
        return float(m.loss(s.params, ins, vt, lengths=vl)["loss"])

    if s.step == 0:
        first = validate()
        history.append((0, first, first))
        if log:
            log.write(json.dumps({"step": 0, "loss": None, "val_loss": first}) + "\n")
    try:
        while s.step < a.steps and not stop.signal:
            ins, tgs, L = src.batch(s.rng, s)
            ins = {k: v.astype(dtype) for k, v in ins.items()}
            if tbptt:
                loss, grads, carry = m.loss_and_grads(s.params, ins, tgs, lengths=L, carry=s.carry,
                                                      return_carry=True)  # fmt: skip
                s.carry = {k: v.copy() for k, v in carry.items()}
            else:
                loss, grads = m.loss_and_grads(s.params, ins, tgs, lengths=L)
            grads = {k: grads[k] for k in s.params}
            if not np.isfinite(loss):
                raise RnncError(
                    f"the loss became {loss} at step {s.step}",
                    hint="lower --lr, or keep --clip on (default 1.0)",
                    code="E540",
                )
            norm = clip(grads, a.clip)
            update(s, grads, lr_at(a, s.step, a.steps), a)
            n_tok = int(L[next(iter(L))].sum()) if L else next(iter(ins.values())).shape[0] * src.B
            tokens += n_tok
            val_loss = None
            if s.step % 50 == 0 or s.step == a.steps:
                val_loss = validate()
            history.append((s.step, float(loss), val_loss))
            elapsed = time.perf_counter() - t_start
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", val=f"{val_loss:.4f}" if val_loss is not None else None,
                                tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}")  # fmt: skip
            if log:
                log.write(json.dumps({"step": s.step, "loss": float(loss), "val_loss": val_loss,
                                      "grad_norm": norm, "lr": lr_at(a, s.step - 1, a.steps),
                                      "tokens_per_s": tokens / max(elapsed, 1e-9)}) + "\n")  # fmt: skip
            if a.checkpoint and (s.step % a.checkpoint_every == 0 or s.step == a.steps):
                save_checkpoint(a.checkpoint, s, meta)
    finally:
        if bar is not None:
            bar.close()
        if log:
            log.close()
    return history, tokens, time.perf_counter() - t_start


class Stop:
    """The first SIGINT or SIGTERM asks the run to stop after the step in progress (a final
    checkpoint, then exit 128 + the signal); a second SIGINT stops at once."""

    def __init__(self):
        self.signal = 0

    def handle(self, signum, frame) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nrnnc: {signal.Signals(signum).name}: stopping after this step "
              "(Ctrl-C again to stop now, saving nothing)", file=sys.stderr)  # fmt: skip


@contextlib.contextmanager
def stop_requests():
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers belong to the main thread; elsewhere the caller's apply
        return
    old = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def check_batch(m: Model, batch, task: str) -> None:
    ins, tgs, _ = batch
    try:
        check_data({**ins, **tgs}, m, f"task '{task}'")
    except RnncError as e:
        raise RnncError(
            f"this spec does not fit the {task} task: {e.message}",
            hint=f"the task gives inputs {fmt_table(ins)} and targets {fmt_table(tgs)}",
            code="E532",
        ) from None


def fmt_table(arrays) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in arrays.items())


def progress(a, start: int):
    if a.quiet or (not sys.stderr.isatty() and os.environ.get("RNNC_PROGRESS") != "1"):
        return None
    from tqdm import tqdm

    return tqdm(total=a.steps, initial=start, unit="step", dynamic_ncols=True)


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


def plot(history, path: str) -> None:
    plt = require_matplotlib()
    steps = [s for s, _, _ in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [l for _, l, _ in history], lw=0.8, alpha=0.6, label="training")
    vs = [(s, v) for s, _, v in history if v is not None]
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
    print(f"wrote {path}")


# ----- generation -----


def sampled_output(m: Model, name: str) -> str:
    """The output a `generate NAME = onehot(sample(o[t-1]))` rule samples from: 'o'."""
    from . import syntax as S

    rule = m.graph.graph["generate"][name]
    match rule.expr:
        case S.Call("onehot", (S.Call("sample", (S.TimeRef(o, 1),)),)):
            return o
    raise RnncError(
        "--generate samples through rules of the form `generate x = onehot(sample(o[t-1]))`",
        rule.span,
        hint="write the rule that way: o is the distribution over the next input",
        code="E542",
    )


def run_generate(a) -> int:
    """Sample a.generate steps from a trained character model through its generate rule."""
    if not a.checkpoint or not os.path.exists(a.checkpoint):
        raise UsageError("--generate needs --checkpoint FILE from a text training run", code="E501")
    info = checkpoint_meta(load_npz(a.checkpoint, "checkpoint"), a.checkpoint)
    if "chars" not in info:
        raise RnncError(
            f"{a.checkpoint} was not trained on text: it has no character set", code="E543"
        )
    chars = meta_field(info, "chars", a.checkpoint, list, ok=charset)
    outside = sorted(set(a.prime) - set(chars))
    if outside:
        raise UsageError(f"--prime has characters the model was not trained on: "
                         f"{''.join(outside)[:40]!r}", code="E501")  # fmt: skip
    m = compile_spec(a.spec, dims={"V": len(chars), **parse_dims(a.dim)}, model=a.model,
                     target=a.target)  # fmt: skip
    rules = m.graph.graph["generate"]
    if len(rules) != 1:
        raise RnncError(
            "--generate needs exactly one `generate x = ...` rule in the model", code="E542"
        )
    (x_name,) = rules
    o_name = sampled_output(m, x_name)
    meta = {"model": m.graph.graph["model"], "task": "text", "chars": chars}
    s = load_checkpoint(a.checkpoint, m, np.float64, meta).on(m.xp)
    index = {c: i for i, c in enumerate(chars)}
    prime = [index[c] for c in (a.prime or ("\n" if "\n" in index else chars[-1]))]
    rng = np.random.default_rng(a.seed)
    V = len(chars)
    carry, out = None, []
    x = np.eye(V)[np.array(prime)][:, None, :]  # the prime, all at once
    for _ in range(a.generate):
        res, carry = m.forward(s.params, {x_name: x}, carry=carry, return_carry=True)
        p = on_host(res[o_name][-1, 0]).astype(np.float64)
        logits = np.log(np.maximum(p, 1e-30)) / a.temperature
        q = np.exp(logits - logits.max())
        nxt = int(rng.choice(V, p=q / q.sum()))
        out.append(nxt)
        x = np.eye(V)[[nxt]][:, None, :]
    print((a.prime or "") + "".join(chars[i] if i else "?" for i in out))
    return 0
