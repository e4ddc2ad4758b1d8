"""The `rnnc` command line: the only place that turns RnncError into a message and an exit code."""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from .compiler import parse_dims, read_file
from .errors import RnncError, UsageError, render

EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3
EXIT_PIPE = 141  # 128 + SIGPIPE, as a shell reports a tool whose reader closed the pipe


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code 2, with our wording
        self.print_usage(sys.stderr)
        print(f"rnnc: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def source_of(path: str) -> str:
    """The text an error points into (bounded like every spec read), or "" if unreadable."""
    from .parse import read_source

    try:
        return read_source(path)
    except (OSError, UnicodeDecodeError):
        return ""


def whole_number(text: str) -> int:
    """An argparse type: a whole number, written 1000, 1_000 or 1e3."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if not np.isfinite(v) or v != int(v):
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    return int(v)


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a misuse, exit 2, otherwise)."""
    v = whole_number(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def remat_arg(text: str) -> int | str:
    """An argparse type: 'auto' or a whole number of steps >= 1."""
    return "auto" if text == "auto" else positive_int(text)


def seed_int(text: str) -> int:
    """An argparse type: a random seed, 0 .. 2**63 - 1."""
    v = whole_number(text)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"{text} must be a whole number from 0 to 2**63 - 1")
    return v


def real(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not np.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number")
    return v


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    v = real(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return v


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    v = real(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number, 0 or more")
    return v


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1) (a momentum)."""
    v = real(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 0 and below 1")
    return v


# ----- commands -----


def cmd_check(a) -> int:
    from .check import require_loss
    from .compiler import front, read_spec
    from .schedule import Loop, schedule

    text, file = read_spec(a.spec)
    _program, g = front(text, file, parse_dims(a.dim), a.model)
    if g.graph.get("loss") is not None:
        require_loss(g)  # before "ok" is printed
    for w in g.graph["warnings"]:
        print(render(w, text, "warning"), file=sys.stderr)
    print(f"model {g.graph['model']} ({file}): ok")
    for kind in ("inputs", "targets"):
        for name, n in g.graph[kind].items():
            d = g.nodes[n]
            what = (
                f"class({d['shape'][0]})"
                if d["classes"]
                else f"[{', '.join(map(str, d['shape']))}]"
            )
            per = "per step" if d["level"] not in ("static", "global") else "per sequence"
            print(f"  {kind[:-1]:7s} {name:12s} {what:14s} {per}")
    total = 0
    for name, n in g.graph["params"].items():
        shape = g.nodes[n]["shape"]
        count = int(np.prod(shape)) if shape else 1
        total += count
        print(f"  param   {name:12s} [{', '.join(map(str, shape))}]{'':4s}{count:>10,d}")
    print(f"  {total:,d} parameters")
    plan = schedule(g, dict(g.graph["outputs"]))
    for step in plan.steps:
        if isinstance(step, Loop):
            names = [g.nodes[n]["name"] for n in step.nodes if g.nodes[n]["name"]]
            delays = sorted({e["delay"] for u, v, e in g.edges(step.nodes, data=True)
                             if v in step.nodes and e["delay"]})  # fmt: skip
            reads = ", ".join(f"t-{k}" if k > 0 else f"t+{-k}" for k in delays)
            way = "forward" if step.direction > 0 else "backward"
            over = sorted({g.nodes[n]["pair"] for n in step.nodes if g.nodes[n]["pair"]})
            att = "".join(f", attends over every step of {o}" for o in over)  # x[s] inside
            print(f"  recurrence ({way} over {step.dom}, reads {reads}{att}): {', '.join(names)}")
    states = sorted(
        {g.nodes[u]["name"] for u, _, e in g.edges(data=True) if e["delay"] and g.nodes[u]["name"]}
    )
    print(f"  states: {', '.join(states) or 'none'}")
    if g.graph.get("loss") is None:
        print("  no loss: forward only (add `loss = ...` to train)")
    print("  " + memory_line(a))
    return 0


def memory_line(a, T: int = 100, B: int = 32) -> str:
    """What a forward pass and a training step hold at the defaults of `rnnc bench`."""
    from .compiler import compile_spec
    from .memory import estimate, fmt_bytes

    m = compile_spec(a.spec, dims=parse_dims(a.dim), model=a.model, load=False)
    line = f"memory at T={T}, B={B} in float32: forward {fmt_bytes(estimate(m, T, B, training=False).total)}"
    if "loss_and_grads" in m.plans:
        line += f", a training step {estimate(m, T, B).describe()}"
        from .remat import reason_not_windowable, window_length

        k = window_length(T)
        if reason_not_windowable(m.graph) is None:
            line += f"; in {k}-step windows (--remat {k}) {fmt_bytes(estimate(m, T, B, window=k).total)}"
    return line


def cmd_fmt(a) -> int:
    from .files import atomic_write
    from .format import format_program
    from .parse import parse

    status = 0
    for path in a.spec:
        text, file = read_file(path)
        out = format_program(parse(text, file))
        if a.check:
            if out != text:
                print(f"{file}: not formatted (run rnnc fmt --write {file})", file=sys.stderr)
                status = EXIT_ERROR
        elif a.write:
            if out != text:
                atomic_write(file, out.encode())
                print(f"formatted {file}")
        else:
            sys.stdout.write(out)
    return status


def cmd_graph(a) -> int:
    from .compiler import front, read_spec
    from .optimize import optimize
    from .picture import render_file, to_dot, unrolled_dot
    from .unroll import unroll

    text, file = read_spec(a.spec)
    _, g = front(text, file, parse_dims(a.dim), a.model)
    if a.unroll is not None:
        T = {
            d: (a.unroll // 2 if info["halves"] else a.unroll)
            for d, info in g.graph["domains"].items()
        }
        dot = unrolled_dot(unroll(g, T))
    else:
        dot = to_dot(optimize(g, fuse=False))
    if a.output:
        render_file(dot, a.output)
        print(f"wrote {a.output}")
    else:
        sys.stdout.write(dot)
    return 0


def cmd_grad(a) -> int:
    from .compiler import compile_spec
    from .explain import explain

    m = compile_spec(a.spec, dims=parse_dims(a.dim), model=a.model)
    if m.grad_graph is None:
        from .check import require_loss

        require_loss(m.graph)
    print(explain(m.plans["loss_and_grads"]))
    return 0


def cmd_compile(a) -> int:
    from .compiler import compile_spec
    from .files import atomic_write

    # only writes code: the cupy target compiles here without CuPy or a GPU
    m = compile_spec(a.spec, target=a.target, dims=parse_dims(a.dim), model=a.model, load=False)
    if a.explain:
        return explain_costs(a, m)
    if a.output:
        atomic_write(a.output, m.source.encode())
        print(f"wrote {a.output}")
    else:
        sys.stdout.write(m.source)
    return 0


def explain_costs(a, m) -> int:
    """--explain: per function and loop, the work a step does and keeps (from the plan), an
    estimate from probes of this machine, and (NumPy target) the measured time a step."""
    from .compiler import compile_spec
    from .explain import cost_report, loop_costs
    from .memory import estimate, require_memory

    plans = {k: m.plans[k] for k in ("forward", "loss_and_grads") if k in m.plans}
    costs = loop_costs(plans, a.batch, 4, a.target, a.steps)
    measured: dict[str, float] = {}
    if a.target != "cupy":  # the CuPy target is timed by `rnnc bench --target cupy` on a GPU
        require_memory(estimate(m, a.steps, a.batch, np.float32).total,
                       f"timing {m.graph.graph['model']} at --batch {a.batch} over {a.steps:,d} steps")  # fmt: skip
        loaded = compile_spec(a.spec, dims=parse_dims(a.dim), model=a.model, target=a.target)
        calls = bench_calls(loaded, a.steps, a.batch, 0)
        for fname, call in zip(("forward", "loss_and_grads"), calls.values(), strict=True):
            if fname not in plans:
                continue  # a model without a loss: its forward pass only
            call()  # warm-up (the native target compiles its loops here, or loads them)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            measured[fname] = 1e6 * sorted(times)[1] / a.steps
    print(f"{m.graph.graph['model']}, {a.target} target, float32")
    print(cost_report(costs, measured, np.float32, a.batch, a.steps, estimate=a.target == "numpy"))
    return 0


def cmd_run(a) -> int:
    from .compiler import compile_spec
    from .data import check_data, load_params
    from .files import load_arrays, on_host, save_arrays
    from .memory import data_steps, estimate, require_memory

    if a.target == "cupy":
        from .compiler import require_gpu

        require_gpu()  # says what is missing: CuPy, the driver, or a device
    if a.generate is not None:
        return cmd_generate(a)
    if a.train:
        return cmd_train(a)
    if not a.data:
        raise UsageError("rnnc run needs --data inputs.npz (or --train)", code="E501")
    m = compile_spec(a.spec, target=a.target, dims=parse_dims(a.dim), model=a.model)
    dtype = np.float64 if a.float64 else np.float32
    arrays = load_arrays(a.data, "data file")
    have_loss = m.graph.graph.get("loss") is not None
    inputs, targets, lengths = check_data(arrays, m, a.data, dtype,
                                          targets="if present" if have_loss else False)  # fmt: skip
    B = next(iter(inputs.values())).shape[1 if m.inputs[next(iter(inputs))][1] != "static" else 0]
    need = estimate(m, data_steps(inputs, m.inputs), B, dtype, training=False)
    require_memory(need.total, f"running {m.graph.graph['model']} on {a.data}")
    params = load_params(a.params, m, dtype) if a.params else m.init_params(a.seed, dtype)
    if targets is not None:
        out = m.loss(params, inputs, targets, lengths=lengths)
    else:
        out = m.forward(params, inputs, lengths=lengths)
    out = {k: on_host(v) for k, v in out.items()}
    for k, v in out.items():
        print(f"  {k:12s} {list(v.shape)}" + (f"  = {float(v):.6g}" if v.ndim == 0 else ""))
    if a.output:
        save_arrays(a.output, out)
        print(f"wrote {a.output}")
    return 0


def cmd_train(a) -> int:
    """`rnnc run --train`: the training API (rnnc/train.py) from the command line's flags;
    under `mpiexec -n N`, data-parallel over N processes."""
    import signal

    from . import train as tr
    from .compiler import compile_spec
    from .data import load_params
    from .files import load_arrays, save_arrays
    from .parallel import world

    if a.plot:
        tr.require_matplotlib()  # before the run, not after it
    if a.resume and a.params:
        raise UsageError("--resume continues a checkpoint; --params starts from a params file: "
                         "give one of them", code="E501")  # fmt: skip
    if a.resume and (not a.checkpoint or not os.path.exists(a.checkpoint)):
        raise UsageError("--resume needs an existing --checkpoint file", code="E501")
    comm = world()
    task = a.task or ("npz" if a.data else None)
    dtype = np.float64 if a.float64 else np.float32
    if task == "npz" or (task is None and a.data):
        if not a.data:
            raise UsageError("--task npz needs --data FILE.npz", code="E501")
        m = compile_spec(a.spec, dims=parse_dims(a.dim), model=a.model, target=a.target)
        arrays = load_arrays(a.data, "data file")
        from .data import check_data

        ins, tgs, L = check_data(arrays, m, a.data, dtype)
        data = tr.Arrays(m, ins, tgs, L, batch=a.batch, dtype=dtype, source=a.data)
        steps0, lr0 = 500, 1e-3
    elif task in tr.Task.DEFAULTS:
        text = read_text(a.text) if a.text and task == "text" else None
        data = tr.Task(task, a.batch, a.seq_len, text)
        m = compile_spec(a.spec, dims={**data.dims(), **parse_dims(a.dim)}, model=a.model,
                         target=a.target)  # fmt: skip
        _, steps0, lr0 = tr.Task.DEFAULTS[task]
    else:
        raise UsageError("--train needs --task adding|copy|reber|reverse|text, or --data FILE.npz",
                         code="E501")  # fmt: skip
    lr = a.lr or lr0
    opt = tr.SGD(lr, a.momentum) if a.optimizer == "sgd" else tr.Adam(lr)
    params = load_params(a.params, m, dtype) if a.params else None
    t = tr.Trainer(m, data, opt, steps=a.steps or steps0, schedule=a.schedule, clip=a.clip,
                   seed=a.seed, dtype=dtype, params=params, checkpoint=a.checkpoint,
                   checkpoint_every=a.checkpoint_every, resume=a.resume, override=a.override,
                   log=a.log, progress=not a.quiet, comm=comm, remat=a.remat)  # fmt: skip
    if not a.output and not a.checkpoint and comm.rank == 0:
        print("rnnc: note: the trained parameters are not saved; add -o params.npz "
              "(or --checkpoint ck.npz) to keep them", file=sys.stderr)  # fmt: skip
    history = t.fit()
    if comm.rank != 0:
        return 128 + t.signal if t.signal else 0
    vals = [r.val_loss for r in history if r.val_loss is not None]
    final = vals[-1] if vals else float("nan")
    name = m.graph.graph["model"]
    if t.signal:
        print(f"rnnc: stopped by {signal.Signals(t.signal).name} after step {t.s.step}"
              + (f"; wrote {a.checkpoint} (continue with --resume)" if a.checkpoint else ""),
              file=sys.stderr)  # fmt: skip
    else:
        ranks = f" on {comm.size} processes" if comm.size > 1 else ""
        print(f"trained {name} on {data.name}{ranks}: {t.s.step} steps in {t.seconds:.1f}s "
              f"({m.target} target), {t.tokens / max(t.seconds, 1e-9):,.0f} tokens/s; "
              f"validation loss {final:.4f}")  # fmt: skip
        if data.name == "adding":
            print(f"  (predicting 1 always scores 0.167; this model scores {final:.4f})")
        if data.name == "text":
            print(f"  {final / data.T / math.log(2):.3f} bits per character on held-out text")
        if a.plot:
            tr.plot(history, a.plot)
            print(f"wrote {a.plot}")
    if a.output:
        save_arrays(a.output, {f"param/{k}": v for k, v in t.params.items()})
        print(f"wrote {a.output}", file=sys.stderr if t.signal else sys.stdout)
    return 128 + t.signal if t.signal else 0


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise RnncError(f"cannot read {path}: {e.strerror or e}", code="E500") from None
    if not text:
        raise UsageError(f"--text {path} is empty", code="E501")
    return text


def cmd_generate(a) -> int:
    """`rnnc run --generate N`: sample from a model trained on text (its checkpoint), or decode
    token ids from any model with a generate rule (--params, other inputs in --data)."""
    from .compiler import compile_spec
    from .files import load_arrays
    from .train import charset, checkpoint_meta, generate, load_checkpoint, meta_field

    if a.params:
        return cmd_decode_tokens(a)
    if not a.checkpoint or not os.path.exists(a.checkpoint):
        raise UsageError("--generate needs --checkpoint FILE from a text training run, or --params FILE "
                         "(token ids: --prime 10, other inputs in --data)", code="E501")  # fmt: skip
    info = checkpoint_meta(load_arrays(a.checkpoint, "checkpoint"), a.checkpoint)
    if "chars" not in info:
        raise RnncError(
            f"{a.checkpoint} was not trained on text: it has no character set", code="E543"
        )
    chars = meta_field(info, "chars", a.checkpoint, list, ok=charset)
    outside = sorted(set(a.prime + (a.end or "")) - set(chars))
    if outside:
        raise UsageError(f"--prime or --end has characters the model was not trained on: "
                         f"{''.join(outside)[:40]!r}", code="E501")  # fmt: skip
    if a.end is not None and len(a.end) != 1:
        raise UsageError(f"--end takes one character, not {a.end!r}", code="E501")
    m = compile_spec(a.spec, dims={"V": len(chars), **parse_dims(a.dim)}, model=a.model,
                     target=a.target)  # fmt: skip
    meta = {"model": m.graph.graph["model"], "task": "text", "chars": chars}
    s = load_checkpoint(a.checkpoint, m, np.float64, meta).on(m.xp)
    print(generate(m, s.params, chars, a.generate, a.prime, a.temperature, a.seed, a.decode, a.top_k,
                   a.beam_width, a.end, a.length_alpha))  # fmt: skip
    return 0


def cmd_decode_tokens(a) -> int:
    """--generate N --params P: decode token ids after --prime (ids, e.g. "10" or "3,1,4") for
    every sequence of --data, which holds the model's other inputs (an image's features, an
    encoder's source with `<domain>.lengths`); one line per sequence."""
    from .compiler import compile_spec
    from .data import check_lengths, check_values, load_params
    from .decode import decode, generate_rule
    from .files import load_arrays

    m = compile_spec(a.spec, dims=parse_dims(a.dim), model=a.model, target=a.target)
    x, _, V = generate_rule(m)
    try:
        prime = [int(t) for t in a.prime.replace(",", " ").split()]
        end = None if a.end is None else int(a.end)
    except ValueError:
        raise UsageError(f"--prime and --end take token ids for this model (0..{V - 1}), e.g. --prime 10",
                         code="E501") from None  # fmt: skip
    if not prime:
        raise UsageError(f"decoding '{x}' needs --prime: the token ids it starts from, e.g. --prime 0",
                         code="E501")  # fmt: skip
    table = {k: v for k, v in m.inputs.items() if k != x}
    arrays = load_arrays(a.data, "data file") if a.data else {}
    if table and not a.data:
        raise UsageError(f"the model's other inputs ({', '.join(table)}) come in --data FILE.npz", code="E501")
    given = check_values(arrays, table, "input", a.data, np.float64) if table else {}
    lengths = check_lengths(arrays, given, table, a.data) if table else None
    B = next((v.shape[0] if table[k][1] == "static" else v.shape[1] for k, v in given.items()), 1)
    params = load_params(a.params, m, np.float64)
    out = decode(m, params, a.generate, [prime] * B, static=given, lengths=lengths, method=a.decode,
                 temperature=a.temperature, top_k=a.top_k, width=a.beam_width, end=end,
                 alpha=a.length_alpha, seed=a.seed)  # fmt: skip
    for b, (tokens, score) in enumerate(zip(out.tokens, out.scores, strict=True)):
        print(f"{b}: {' '.join(map(str, tokens))}  (log-probability {score:.6g})")
    return 0


def cmd_gradcheck(a) -> int:
    from .gradcheck import gradcheck

    report = gradcheck(a.spec, dims=parse_dims(a.dim), model=a.model, T=a.steps, batch=a.batch,
                       seed=a.seed, eps=a.eps, directions=a.directions,
                       lengths=not a.no_lengths, target=a.target)  # fmt: skip
    print(f"{'tensor':24s} {'shape':14s} {'directions':>10s} {'rel. error':>11s}")
    bad = [r for r in report if not r.error <= a.tol]  # NaN fails too
    for row in report:
        flag = f"   FAIL{': ' + row.note if row.note else ''}" if row in bad else "   ok"
        print(f"{row.name:24s} {list(row.shape)!s:14s} {row.checked:10d} {row.error:11.2e}{flag}")
    worst = max((r.error for r in report), default=0.0)
    print(f"largest relative error {worst:.2e} (norm-wise per tensor over random directions, "
          f"central differences in float64); tolerance {a.tol:g}: "
          f"{'FAILED' if bad else 'ok'}")  # fmt: skip
    return EXIT_ERROR if bad else 0


def cmd_bench(a) -> int:
    from .compiler import compile_spec
    from .memory import estimate, require_memory

    dims = parse_dims(a.dim)
    specs = [a.spec] + ([a.against] if a.against else [])
    # the cupy target checks for CuPy and a GPU first, and says what is missing
    models = [compile_spec(s, dims=dims, model=a.model if s == a.spec else None, target=a.target)
              for s in specs]  # fmt: skip
    for m in models:
        require_memory(estimate(m, a.steps, a.batch, np.float32).total,
                       f"timing {m.graph.graph['model']} at --batch {a.batch} over {a.steps:,d} steps")  # fmt: skip
    # GPU work is asynchronous: a time counts only once the device has finished
    done = models[0].xp.cuda.Device().synchronize if a.target == "cupy" else lambda: None
    calls = [bench_calls(m, a.steps, a.batch, a.seed) for m in models]
    timings: list[dict[str, list[float]]] = [{name: [] for name in c} for c in calls]
    for c in calls:  # warm up (and compile kernels)
        for fn in c.values():
            fn()
        done()
    for _ in range(a.repeat):  # rounds interleaved, so that a busy moment hits both alike
        for c, t in zip(calls, timings, strict=True):
            for name, fn in c.items():
                t0 = time.perf_counter()
                fn()
                done()
                t[name].append(time.perf_counter() - t0)
    names = [m.graph.graph["model"] for m in models]
    print(f"T={a.steps}, B={a.batch}, median of {a.repeat}" +
          ("; masks drawn in training" if any(m.masks for m in models) else ""))  # fmt: skip
    for name in calls[0]:
        cells = []
        for n, t in zip(names, timings, strict=True):
            per_step = float(np.median(t[name])) / a.steps
            cells.append(f"{n} {per_step * 1e6:8.1f} us/step ({per_step * a.steps * 1e3:.2f} ms)")
        ratio = ""
        if len(timings) == 2:
            ratio = f"   {np.median(timings[0][name]) / np.median(timings[1][name]):.2f}x"
        print(f"{name:28s} " + "   vs ".join(cells) + ratio)
    return 0


def bench_calls(m, T: int, B: int, seed: int) -> dict:
    """The timed calls: evaluation (forward, no masks) and a training step's loss and
    gradients (dropout and zoneout masks drawn from a generator, as training does)."""
    from .gradcheck import random_batch

    params = m.init_params(seed, np.float32)
    inputs, targets, _ = random_batch(m, T, B, seed, np.float32)
    # the data on the device before the clock starts, as a training loop would keep it
    inputs = {k: m.xp.asarray(v) for k, v in inputs.items()}
    targets = {k: m.xp.asarray(v) for k, v in targets.items()}
    rng = np.random.default_rng(seed)
    return {"forward (evaluation)": lambda: m.forward(params, inputs),
            "forward+backward (training)": lambda: m.loss_and_grads(params, inputs, targets, rng=rng)}  # fmt: skip


def cmd_convert(a) -> int:
    """torch state_dict (.pt) <-> rnnc params (.npz / .safetensors), checked numerically."""
    from . import interop
    from .compiler import compile_spec
    from .data import load_params
    from .files import atomic_write, save_arrays

    kinds = (".pt", ".pth", ".npz", ".safetensors")
    for path in (a.input, a.output):
        if not path.lower().endswith(kinds):
            raise UsageError(f"'{path}': convert reads and writes .pt (torch), .npz or .safetensors files",
                             code="E501")  # fmt: skip
    src_torch = a.input.lower().endswith((".pt", ".pth"))
    dst_torch = a.output.lower().endswith((".pt", ".pth"))
    if src_torch == dst_torch:
        raise UsageError("convert goes from a torch state_dict (.pt) to rnnc params (.npz or "
                         ".safetensors), or back", code="E501")  # fmt: skip
    if src_torch:
        sd = read_state_dict(a.input)
        model = compile_spec(a.spec, dims=parse_dims(a.dim), model=a.model, target="numpy") if a.spec else None
        model, params, report = interop.from_torch(sd, model, a.instance, a.nonlinearity)
        save_arrays(a.output, {f"param/{k}": v for k, v in params.items()})
        if a.spec_out:
            atomic_write(a.spec_out, model.program.source.encode())  # the spec the params belong to
        print(f"{report}\nwrote {a.output}" + (f" and {a.spec_out}" if a.spec_out else ""))
        return 0
    if not a.spec:
        raise UsageError("converting rnnc params to torch needs --spec SPEC (the model they belong to)",
                         code="E501")  # fmt: skip
    torch = interop.require_torch()
    model = compile_spec(a.spec, dims=parse_dims(a.dim), model=a.model, target="numpy")  # one checked batch
    params = load_params(a.input, model, np.float64)
    kind = "RNN_RELU" if a.nonlinearity == "relu" else None
    sd = interop.to_torch(model, params, a.instance, kind=kind, bias=not a.no_bias)
    buf = io.BytesIO()
    torch.save(sd, buf)
    atomic_write(a.output, buf.getvalue())
    print(f"{model.graph.graph['model']} -> torch state_dict ({len(sd)} tensors): outputs agree "
          f"(float64, limit {interop.TOLERANCE:g})\nwrote {a.output}")  # fmt: skip
    return 0


def cmd_export(a) -> int:
    """The forward pass as ONNX, checked against rnnc on a random batch."""
    from .compiler import compile_spec
    from .data import load_params
    from .export import OPSET, export_to

    m = compile_spec(a.spec, dims=parse_dims(a.dim), model=a.model, target="numpy")  # one checked batch
    params = load_params(a.params, m, np.float32) if a.params else None
    proto, err = export_to(m, a.output, params, loss=a.loss)
    print(f"wrote {a.output}: {len(proto.graph.node)} nodes, opset {OPSET}, outputs "
          f"{', '.join(o.name for o in proto.graph.output)}; onnx.checker passed; onnx's reference "
          f"evaluator reproduces rnnc's forward pass to {err:.1e}")  # fmt: skip
    return 0


def read_state_dict(path: str) -> dict:
    """A torch state_dict from a .pt file, with torch.load(weights_only=True): never
    unpickling anything but tensors and containers."""
    from . import interop

    torch = interop.require_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RnncError(f"'{path}' does not exist", code="E505") from None
    except Exception as e:  # UnpicklingError: objects beyond tensors; RuntimeError: not a torch file
        text = str(e)
        if "Unsupported global" in text:  # a class the weights-only unpickler will not build
            why = "it holds Python objects beyond tensors (a pickled module?)"
        elif "Weights only" in text:
            why = "it is damaged or not a torch.save file"
        else:
            why = f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
        raise RnncError(f"'{path}' is not a torch file of weights only ({why})",
                        hint="save module.state_dict() with torch.save; rnnc never unpickles code",
                        code="E505") from None  # fmt: skip
    if not isinstance(obj, dict) or not all(hasattr(v, "detach") for v in obj.values()):
        raise RnncError(f"'{path}' holds {type(obj).__name__}, not a state_dict of tensors",
                        hint="save module.state_dict()", code="E571")  # fmt: skip
    return obj


# ----- the parser -----


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="rnnc", description="A compiler for recurrent neural networks.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def spec_cmd(name: str, help: str):
        c = sub.add_parser(name, help=help)
        c.add_argument("spec", help="a .rnn file")
        c.add_argument("--dim", action="append", metavar="NAME=N", help="set a dimension")
        c.add_argument("--model", help="which model of the file (default: the last)")
        return c

    spec_cmd("check", "parse, infer shapes, check; summarize params and states")
    c = sub.add_parser("fmt", help="print the canonical formatting")
    c.add_argument("spec", nargs="+")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if not formatted")
    g.add_argument("--write", action="store_true", help="rewrite the file in place (atomically)")
    c = spec_cmd("graph", "draw the graph (DOT; SVG/PNG with Graphviz)")
    c.add_argument("--unroll", type=positive_int, metavar="T", help="draw the graph unrolled over T steps")
    c.add_argument("-o", "--output", help="out.dot, out.svg or out.png (default: DOT on stdout)")
    spec_cmd("grad", "print the derived backward (BPTT) equations")
    c = spec_cmd("compile", "generate a standalone Python module")
    c.add_argument(
        "--target",
        default="numpy",
        choices=["numpy", "native", "cupy"],
        help="numpy (the default here: the readable module, NumPy only); native (each time loop "
        "compiled by numba when it runs); or cupy (fused CUDA kernels; written on any machine)",
    )
    c.add_argument("-o", "--output", help="model.py (default: stdout)")
    c.add_argument("--explain", action="store_true", help="print, per loop, the GEMMs, pointwise work, "
                   "fused kernels and bytes kept a step, an estimate and the measured time a step")  # fmt: skip
    c.add_argument("--batch", type=positive_int, default=32, help="--explain: sequences in a batch")
    c.add_argument("--steps", type=positive_int, default=100, help="--explain: steps of a sequence")
    c = spec_cmd("run", "run the forward pass and loss, train, or generate")
    c.add_argument("--data", help=".npz or .safetensors with one array per input (and target)")
    c.add_argument(
        "--target",
        choices=["numpy", "native", "cupy"],
        help="native: each time loop compiled by numba (the default where numba imports; "
        "$RNNC_TARGET sets another); numpy: no compiling; cupy: an NVIDIA GPU (needs rnnc[cupy])",
    )
    c.add_argument("--params", help=".npz or .safetensors of parameters (default: fresh from --seed); with "
                   "--train, the parameters to start from (fine-tuning)")
    c.add_argument("-o", "--output", help="write outputs to this .npz (or .safetensors)")
    c.add_argument("--seed", type=seed_int, default=0)
    c.add_argument("--float64", action="store_true", help="compute in float64 (default float32)")
    c.add_argument("--train", action="store_true", help="train the model")
    c.add_argument("--generate", type=positive_int, metavar="N", help="sample N steps from a trained model")
    add_training_args(c)
    c = spec_cmd("export", "the forward pass as an ONNX model (inference)")
    c.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    c.add_argument("--params", help="the weights to export (.npz or .safetensors; default: the spec's initialization)")
    c.add_argument("--loss", action="store_true", help="the targets as inputs too, and the loss as an output")
    c = sub.add_parser("convert", help="torch state_dict (.pt) <-> rnnc params, checked numerically")
    c.add_argument("input", help="a torch state_dict (.pt), or rnnc params (.npz, .safetensors)")
    c.add_argument("-o", "--output", required=True, help="rnnc params (.npz, .safetensors), or a .pt")
    c.add_argument("--spec", help="the spec the params belong to (default from torch: the library cell)")
    c.add_argument("--dim", action="append", metavar="NAME=N", help="set a dimension of --spec")
    c.add_argument("--model", help="which model of --spec")
    c.add_argument("--instance", default="h", help="the cell instance holding the weights (default h)")
    c.add_argument("--nonlinearity", choices=["tanh", "relu"], help="of a torch.nn.RNN (default tanh)")
    c.add_argument("--no-bias", action="store_true", help="to torch: a bias=False module")
    c.add_argument("--spec-out", metavar="FILE", help="from torch: also write the library spec used")
    c = spec_cmd("gradcheck", "compare gradients with central differences in float64")
    c.add_argument("--steps", type=positive_int, default=5, help="sequence length T (default 5)")
    c.add_argument("--batch", type=positive_int, default=2)
    c.add_argument("--seed", type=seed_int, default=0)
    c.add_argument("--eps", type=positive_float, default=None,
                   help="the step along each direction (default 1e-3, Richardson-extrapolated; "
                   "1e-6 plain for models with kinks such as relu)")  # fmt: skip
    c.add_argument("--tol", type=positive_float, default=1e-7,
                   help="largest allowed relative error (default 1e-7)")  # fmt: skip
    c.add_argument("--directions", "--samples", type=positive_int, default=8,
                   help="random directions per tensor (default 8)")  # fmt: skip
    c.add_argument("--no-lengths", action="store_true",
                   help="every sequence full length (default: random lengths)")  # fmt: skip
    c.add_argument("--target", default="numpy", choices=["numpy", "native"],
                   help="the code checked (default numpy, the reference: no loops to compile)")  # fmt: skip
    c = spec_cmd("bench", "time forward and forward+backward")
    c.add_argument("--steps", type=positive_int, default=100)
    c.add_argument("--batch", type=positive_int, default=32)
    c.add_argument("--repeat", type=positive_int, default=5)
    c.add_argument("--seed", type=seed_int, default=0)
    c.add_argument("--target", choices=["numpy", "native", "cupy"],
                   help="default: native where numba imports (or $RNNC_TARGET); cupy times the "
                   "fused GPU code (needs rnnc[cupy] and a GPU)")  # fmt: skip
    c.add_argument("--against", metavar="SPEC", help="a second spec timed in the same rounds (same --dim): "
                   "per-step times side by side, and the ratio")  # fmt: skip
    return p


def add_training_args(c: argparse.ArgumentParser) -> None:
    """Training options (rnnc/train.py reads them)."""
    c.add_argument("--task", help="built-in task: adding, copy, reber, reverse, text, npz")
    c.add_argument("--text", help="a text file for the character task (default: Python's docs)")
    c.add_argument("--steps", type=positive_int, help="training steps")
    c.add_argument("--batch", type=positive_int, default=32)
    c.add_argument("--seq-len", type=positive_int, help="sequence length (or BPTT window)")
    c.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    c.add_argument("--lr", type=positive_float, default=None)
    c.add_argument("--momentum", type=fraction, default=0.9)
    c.add_argument("--clip", type=nonnegative_float, default=1.0, help="global gradient-norm clip (0: off)")
    c.add_argument("--schedule", choices=["constant", "cosine", "step"], default="constant")
    c.add_argument("--checkpoint", help="checkpoint file (.npz or .safetensors), written atomically")
    c.add_argument("--checkpoint-every", type=positive_int, default=100)
    c.add_argument("--remat", type=remat_arg, metavar="K|auto",
                   help="checkpointing over time: keep the state every K steps and recompute each "
                   "window's activations in the backward pass (same gradients, about sqrt(T) of the "
                   "memory for one more forward pass); auto: sqrt(T)-step windows when a training "
                   "step would not fit in memory")  # fmt: skip
    c.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    c.add_argument("--override", action="store_true",
                   help="with --resume: continue with settings (--lr, --batch, ...) other than the "
                   "checkpoint's")  # fmt: skip
    c.add_argument("--plot", help="draw training and validation loss to this PNG")
    c.add_argument("--log", help="append metrics as JSON lines")
    c.add_argument("--prime", default="", help="text to start generation from (with --params: token ids)")
    c.add_argument("--temperature", type=positive_float, default=1.0)
    c.add_argument("--decode", choices=["sample", "greedy", "beam"], default="sample",
                   help="--generate: sample (--temperature, --top-k), the likeliest character "
                   "(greedy), or beam search (--beam-width, --end, --length-alpha)")  # fmt: skip
    c.add_argument("--top-k", type=positive_int, help="sample among the K likeliest characters")
    c.add_argument("--beam-width", type=positive_int, default=4)
    c.add_argument("--end", help="a character that ends the generated text (beam search ranks "
                   "the texts that reach it)")  # fmt: skip
    c.add_argument("--length-alpha", type=float, default=0.0,
                   help="beam search ranks finished texts by log-probability / length ** ALPHA")  # fmt: skip
    c.add_argument("--quiet", action="store_true")


COMMANDS = {
    "check": cmd_check, "fmt": cmd_fmt, "graph": cmd_graph, "grad": cmd_grad,
    "compile": cmd_compile, "run": cmd_run, "gradcheck": cmd_gradcheck, "bench": cmd_bench,
    "convert": cmd_convert, "export": cmd_export,
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit code (0 ok, 1 error in the spec or data, 2 misuse, 3 bug)."""
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    code = run_command(a)
    if code not in (0, 130, 143) and "mpi4py.MPI" in sys.modules:
        from .parallel import world

        sys.stderr.flush()
        world().abort(code)  # under mpiexec: the other processes must not wait for this one
    return code


def run_command(a) -> int:
    try:
        if getattr(a, "target", "") is None:  # run, bench: the default target ($RNNC_TARGET, native, numpy)
            from .compiler import default_target

            a.target = default_target()
        return COMMANDS[a.command](a)
    except UsageError as e:
        print(f"rnnc: {render(e, None)}", file=sys.stderr)
        return EXIT_USAGE
    except RnncError as e:
        file = e.span.file
        text = source_of(file) if file and file != "<spec>" and os.path.exists(file) else None
        if text is None and getattr(a, "spec", None) and not os.path.exists(a.spec):
            text = a.spec
        print(render(e, text), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("rnnc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`rnnc check spec | head -1`): stop quietly
        quiet_stdout()
        return EXIT_PIPE
    except Exception as e:  # a bug in rnnc, not the user's fault
        if a.debug:
            raise
        print(f"rnnc: internal error: {type(e).__name__}: {e}\n"
              "  this is a bug in rnnc; run with --debug for the traceback", file=sys.stderr)  # fmt: skip
        return EXIT_INTERNAL


def quiet_stdout() -> None:
    """Send what is left of stdout nowhere, so exiting does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def entry() -> None:
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        quiet_stdout()
        code = EXIT_PIPE
    sys.exit(code)
