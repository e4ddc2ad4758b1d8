"""rnnc against the peers a user would pick instead: PyTorch (nn.RNN/LSTM/GRU), JAX (jit of a
lax.scan over the same equations) and, for inference, ONNX Runtime (rnnc's ONNX export, whose
library cells become ONNX's own RNN/LSTM/GRU operators). float32, the library cells in
PyTorch's layout with the same weights everywhere (rnnc.interop.from_torch), loss = the mean
squared error summed over steps and averaged over the batch, as rnnc's `mse` is.

Each system runs in its own process with its default threading; a round runs every system
once over every (cell, size, mode), in an order rotated from round to round; a system's time
at a point is the median over rounds of its median over --iters calls after a warm-up. Each
process first checks its outputs (and, training, its gradients) against PyTorch's, computed
in the same process, and the table prints the largest norm-wise difference.

    pip install ".[peers]"                       # torch, jax[cpu], onnx, onnxruntime
    python bench/peers.py [--rounds 3 --iters 5 --cells rnn,lstm,gru --sizes all]

Ratios > 1: rnnc is slower than the best peer at that point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"small": (1, 100, 64, 64), "medium": (32, 100, 256, 256), "large": (64, 50, 512, 512),
         "long": (16, 500, 128, 128)}  # fmt: skip
CELLS = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
SYSTEMS = ["rnnc", "native", "torch", "jax", "ort"]  # rnnc: the NumPy target; native: the default target
OURS = ("rnnc", "native")
# --custom: cells PyTorch has no layer for, from rnnc's library, against the same cell written
# as a PyTorch Python loop, that loop under torch.compile, and a JAX lax.scan
CUSTOM = {"mgu": "MGU", "peephole": "PeepholeLSTM", "lnlstm": "LNLSTM"}
CUSTOM_SYSTEMS = ["rnnc", "native", "loop", "compile", "jax"]
SPEC = """use {cell}

model m {{
  dim I = {I}, H = {H}
  input x[I] : sequence
  target y[H] : sequence
  h = {cell}(x, H=H)
  loss = mse(h, y)
}}
"""


def available(system: str) -> bool:
    mod = {"rnnc": "numpy", "native": "numba", "torch": "torch", "loop": "torch", "compile": "torch", "jax": "jax",
           "ort": "onnxruntime"}[system]  # fmt: skip
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def torch_reference(cell: str, B: int, T: int, I: int, H: int):
    """The torch module (seed 0), the data, and torch's outputs, loss gradients and weights."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    ref = getattr(torch.nn, CELLS[cell])(I, H)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(T, B, I)).astype(np.float32)
    y = rng.normal(size=(T, B, H)).astype(np.float32)
    xt = torch.from_numpy(x)
    out = ref(xt)[0]
    loss = ((out - torch.from_numpy(y)) ** 2).mean(-1).sum(0).mean()
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    names = [n for n, _ in ref.named_parameters()]
    want = {"out": out.detach().numpy(), **{n: g.numpy() for n, g in zip(names, grads, strict=True)}}
    return ref, x, y, want


def calls_rnnc(cell, ref, x, y, I, H, target="numpy"):
    import numpy as np

    from rnnc.compiler import compile_spec
    from rnnc.interop import from_torch

    m = compile_spec(SPEC.format(cell=CELLS[cell], I=I, H=H), target=target)
    _, p64, _ = from_torch(ref.double(), model=m)
    ref.float()
    params = {k: v.astype(np.float32) for k, v in p64.items()}
    names = {f"h.{n.removesuffix('_l0')}": n for n, _ in ref.named_parameters()}

    def train():
        _, g = m.loss_and_grads(params, {"x": x}, {"y": y})
        return {names[k]: v for k, v in g.items() if k in names}

    return (lambda: {"out": m.forward(params, {"x": x})["h"]}), train


def calls_torch(cell, ref, x, y, I, H):
    import torch

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    params = list(ref.parameters())
    names = [n for n, _ in ref.named_parameters()]

    def forward():
        with torch.no_grad():
            return {"out": ref(xt)[0].numpy()}

    def train():
        loss = ((ref(xt)[0] - yt) ** 2).mean(-1).sum(0).mean()
        return {n: g.numpy() for n, g in zip(names, torch.autograd.grad(loss, params), strict=True)}

    return forward, train


def calls_jax(cell, ref, x, y, I, H):
    import jax
    import jax.numpy as jnp

    w = {n: jnp.asarray(p.detach().numpy()) for n, p in ref.named_parameters()}

    def run(w, x):
        xs = x @ w["weight_ih_l0"].T + w["bias_ih_l0"]  # the input projection for all steps at once
        B = x.shape[1]

        def rnn(h, xi):
            h = jnp.tanh(xi + h @ w["weight_hh_l0"].T + w["bias_hh_l0"])
            return h, h

        def lstm(hc, xi):
            h, c = hc
            i, f, g, o = jnp.split(xi + h @ w["weight_hh_l0"].T + w["bias_hh_l0"], 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        def gru(h, xi):
            hh = h @ w["weight_hh_l0"].T + w["bias_hh_l0"]
            xr, xz, xn = jnp.split(xi, 3, axis=-1)
            hr, hz, hn = jnp.split(hh, 3, axis=-1)
            r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
            n = jnp.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
            return h, h

        zeros = jnp.zeros((B, H), x.dtype)
        step, init = {"rnn": (rnn, zeros), "lstm": (lstm, (zeros, zeros)), "gru": (gru, zeros)}[cell]
        return jax.lax.scan(step, init, xs)[1]

    def loss(w, x, y):
        return ((run(w, x) - y) ** 2).mean(-1).sum(0).mean()

    fwd, grad = jax.jit(run), jax.jit(jax.grad(loss))
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    forward = lambda: {"out": jax.block_until_ready(fwd(w, xj))}  # noqa: E731
    train = lambda: jax.block_until_ready(grad(w, xj, yj))  # noqa: E731
    return forward, train


def calls_ort(cell, ref, x, y, I, H):
    import numpy as np
    import onnxruntime as ort

    from rnnc.compiler import compile_spec
    from rnnc.export import export
    from rnnc.interop import from_torch

    m = compile_spec(SPEC.format(cell=CELLS[cell], I=I, H=H), target="numpy")  # its graph is exported
    _, p64, _ = from_torch(ref.double(), model=m)
    ref.float()
    onnx_model = export(m, {k: v.astype(np.float32) for k, v in p64.items()})
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return (lambda: {"out": sess.run(None, {name: x})[0]}), None


def custom_weights(cell: str, I: int, H: int):
    """rnnc's spec of the library cell and its parameters (seed 0, perturbed so that no gain
    is exactly 1), float32."""
    import numpy as np

    from rnnc.compiler import compile_spec

    m = compile_spec(SPEC.format(cell=CUSTOM[cell], I=I, H=H), target="numpy")  # the "rnnc" column
    rng = np.random.default_rng(2)
    w = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in m.init_params(0, np.float64).items()}
    return m, w


def custom_step(cell: str, w, state, xp, o):
    """One step of the cell written by hand (o: sigmoid, tanh, ln), the input projection xp
    computed for all steps beforehand: -> (state, h)."""
    H = w["h.weight_ih"].shape[0] // {"mgu": 2, "peephole": 4, "lnlstm": 4}[cell]
    if cell == "mgu":
        (h,) = state
        gi = xp + w["h.bias"]
        f = o.sigmoid(gi[:, :H] + h @ w["h.weight_hf"].T)
        n = o.tanh(gi[:, H:] + (f * h) @ w["h.weight_hn"].T)
        h = (1 - f) * h + f * n
        return (h,), h
    h, c = state
    if cell == "peephole":
        z = xp + h @ w["h.weight_hh"].T + w["h.bias"]
        i = o.sigmoid(z[:, :H] + w["h.peep_i"] * c)
        f = o.sigmoid(z[:, H : 2 * H] + w["h.peep_f"] * c)
        c = f * c + i * o.tanh(z[:, 2 * H : 3 * H])
        h = o.sigmoid(z[:, 3 * H :] + w["h.peep_o"] * c) * o.tanh(c)
        return (h, c), h
    z = w["h.gamma_ih"] * o.ln(xp) + w["h.gamma_hh"] * o.ln(h @ w["h.weight_hh"].T) + w["h.bias"]
    i, f = o.sigmoid(z[:, :H]), o.sigmoid(z[:, H : 2 * H])
    c = f * c + i * o.tanh(z[:, 2 * H : 3 * H])
    h = o.sigmoid(z[:, 3 * H :]) * o.tanh(w["h.gamma_c"] * o.ln(c) + w["h.beta_c"])
    return (h, c), h


def custom_reference(cell, B, T, I, H):
    """The PyTorch Python loop's outputs and gradients, the yardstick of the --custom table."""
    import numpy as np

    m, w = custom_weights(cell, I, H)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(T, B, I)).astype(np.float32)
    y = rng.normal(size=(T, B, H)).astype(np.float32)
    forward, train = calls_loop(cell, m, w, x, y, H, compiled=False)
    return m, w, x, y, {**forward(), **train()}


def calls_loop(cell, m, w, x, y, H, compiled: bool):
    import torch
    import torch.nn.functional as F

    o = type("ops", (), {"sigmoid": staticmethod(torch.sigmoid), "tanh": staticmethod(torch.tanh),
                         "ln": staticmethod(lambda v: F.layer_norm(v, v.shape[-1:]))})  # fmt: skip
    wt = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def run(wt, xt):
        xp = xt @ wt["h.weight_ih"].T  # the input projection for all steps at once
        zero = xt.new_zeros(xt.shape[1], H)
        state, out = ((zero,) if cell == "mgu" else (zero, zero)), []
        for t in range(xt.shape[0]):
            state, h = custom_step(cell, wt, state, xp[t], o)
            out.append(h)
        return torch.stack(out)

    run = torch.compile(run) if compiled else run

    def forward():
        with torch.no_grad():
            return {"out": run(wt, xt).numpy()}

    def train():
        loss = ((run(wt, xt) - yt) ** 2).mean(-1).sum(0).mean()
        names = list(wt)
        return {n: g.numpy() for n, g in zip(names, torch.autograd.grad(loss, [wt[n] for n in names]), strict=True)}

    return forward, train


def custom_calls(system, cell, m, w, x, y, H):
    if system == "native":
        from rnnc.compiler import compile_spec

        m = compile_spec(SPEC.format(cell=CUSTOM[cell], I=x.shape[-1], H=H), target="native")
    if system in OURS:
        return (lambda: {"out": m.forward(w, {"x": x})["h"]}), (lambda: m.loss_and_grads(w, {"x": x}, {"y": y})[1])
    if system in ("loop", "compile"):
        return calls_loop(cell, m, w, x, y, H, compiled=system == "compile")
    import jax
    import jax.numpy as jnp

    def ln(v):
        mean = v.mean(-1, keepdims=True)
        return (v - mean) / jnp.sqrt(((v - mean) ** 2).mean(-1, keepdims=True) + 1e-5)

    o = type("ops", (), {"sigmoid": staticmethod(jax.nn.sigmoid), "tanh": staticmethod(jnp.tanh),
                         "ln": staticmethod(ln)})  # fmt: skip
    wj = {k: jnp.asarray(v) for k, v in w.items()}

    def run(wj, x):
        zero = jnp.zeros((x.shape[1], H), x.dtype)
        init = (zero,) if cell == "mgu" else (zero, zero)
        return jax.lax.scan(lambda s, xp: custom_step(cell, wj, s, xp, o), init, x @ wj["h.weight_ih"].T)[1]

    def loss(wj, x, y):
        return ((run(wj, x) - y) ** 2).mean(-1).sum(0).mean()

    fwd, grad = jax.jit(run), jax.jit(jax.grad(loss))
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    return (lambda: {"out": jax.block_until_ready(fwd(wj, xj))}), (lambda: jax.block_until_ready(grad(wj, xj, yj)))


def worker(system: str, points: list, iters: int) -> None:
    import numpy as np

    sys.path.insert(0, os.path.join(HERE, ".."))
    native = lambda *a: calls_rnnc(*a, target="native")  # noqa: E731
    make = {"rnnc": calls_rnnc, "native": native, "torch": calls_torch, "jax": calls_jax,
            "ort": calls_ort}.get(system)  # fmt: skip
    for cell, size in points:
        B, T, I, H = SIZES[size]
        if cell in CUSTOM:
            m, w, x, y, want = custom_reference(cell, B, T, I, H)
            fwd, train = custom_calls(system, cell, m, w, x, y, H)
        else:
            ref, x, y, want = torch_reference(cell, B, T, I, H)
            fwd, train = make(cell, ref, x, y, I, H)
        for mode, fn in (("forward", fwd), ("training", train)):
            if fn is None:
                continue
            got = fn()  # warm-up (jit, kernels) and the check against torch
            keys = ["out"] if mode == "forward" else [k for k in want if k != "out"]
            err = max(float(np.linalg.norm(np.asarray(got[k]) - want[k]) / np.linalg.norm(want[k])) for k in keys)
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            print(json.dumps({"system": system, "cell": cell, "size": size, "mode": mode,
                              "ms": 1e3 * sorted(times)[iters // 2], "err": err}), flush=True)  # fmt: skip


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--cells", default="rnn,lstm,gru")
    ap.add_argument("--sizes", default="all", help="comma-separated of " + ", ".join(SIZES))
    ap.add_argument("--systems", help="comma-separated subset of the systems (default: all installed)")
    ap.add_argument("--custom", action="store_true", help="the custom cells (" + ", ".join(CUSTOM) + ") "
                    "against a PyTorch Python loop, torch.compile and JAX")  # fmt: skip
    a = ap.parse_args()
    sizes = list(SIZES) if a.sizes == "all" else a.sizes.split(",")
    cells = ",".join(CUSTOM) if a.custom and a.cells == "rnn,lstm,gru" else a.cells
    points = [(c, s) for c in cells.split(",") for s in sizes]
    every = CUSTOM_SYSTEMS if a.custom else SYSTEMS
    systems = [s for s in every if available(s) and (not a.systems or s in a.systems.split(","))]
    missing = [s for s in every if not available(s)]
    runs: dict[tuple, list[dict]] = {}
    for r in range(a.rounds):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]  # rotated each round
        for system in order:
            p = subprocess.run([sys.executable, __file__, "--worker", system, json.dumps(points), str(a.iters)],
                               capture_output=True, text=True)  # fmt: skip
            if p.returncode != 0:
                print(f"{system}: failed\n{p.stderr[-3000:]}")
                return 1
            for line in p.stdout.splitlines():
                row = json.loads(line)
                runs.setdefault((row["cell"], row["size"], row["mode"], row["system"]), []).append(row)
    yardstick = "the PyTorch loop" if a.custom else "PyTorch"
    print(f"float32, median of {a.rounds} rounds x {a.iters} calls; ms per call; err = largest norm-wise "
          f"difference from {yardstick}{'; not installed: ' + ', '.join(missing) if missing else ''}")  # fmt: skip
    print(f"{'cell':5s} {'B,T,I,H':15s} {'mode':9s} " + " ".join(f"{s:>9s}" for s in systems)
          + f" {'best peer':>9s} {'rnnc/best':>9s} {'native/best':>11s} {'max err':>8s}")  # fmt: skip
    for cell, size in points:
        for mode in ("forward", "training"):
            ms = {s: sorted(r["ms"] for r in runs[(cell, size, mode, s)])[a.rounds // 2]
                  for s in systems if (cell, size, mode, s) in runs}  # fmt: skip
            err = max(r["err"] for s in systems for r in runs.get((cell, size, mode, s), []))
            peers = {s: t for s, t in ms.items() if s not in OURS}
            best = min(peers, key=peers.get) if peers else None
            ratio, ratio_native = (f"{ms[s] / peers[best]:{w}.2f}" if best and s in ms else f"{'-':>{w}s}"
                                   for s, w in (("rnnc", 9), ("native", 11)))  # fmt: skip
            cols = " ".join(f"{ms[s]:9.2f}" if s in ms else f"{'-':>9s}" for s in systems)
            print(f"{cell:5s} {','.join(map(str, SIZES[size])):15s} {mode:9s} {cols} {best or '-':>9s} "
                  f"{ratio} {ratio_native} {err:8.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
