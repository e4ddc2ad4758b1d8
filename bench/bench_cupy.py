"""The CuPy target against PyTorch's cuDNN LSTM and GRU on the same GPU.

    python bench/bench_cupy.py --launches     # per step: GEMMs and kernel launches (no GPU needed)
    python bench/bench_cupy.py [--rounds 5]   # times (needs CuPy, a GPU, and torch with CUDA)

Each side runs in its own process (one round = one fresh process timing the median of --iters
calls after warm-up); rounds alternate rnnc, torch, rnnc, ... and the ratio printed is the
median over rounds of rnnc / cuDNN, as bench_numpy.py does on the CPU."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

SIZES = [(64, 100, 512, 512), (64, 100, 1024, 1024), (256, 50, 1024, 1024)]


def launches() -> None:
    from rnnc.compiler import compile_spec
    from rnnc.fuse import Accumulate, Kernel, loop_kernels

    print("cell    function        loop      per step")
    for kind in ("lstm", "gru", "rnn", "lstm_vd", "ln_lstm"):
        spec = os.path.join(HERE, "specs", f"{kind}_layer.rnn")
        m = compile_spec(spec, dims={"I": 512, "H": 512}, target="cupy", load=False)
        for fname in ("loss", "loss_and_grads"):
            plan = m.plans[fname]
            for i, items in loop_kernels(plan, fname, str).items():
                ops = [plan.graph.nodes[n]["op"] for x in items if isinstance(x, list) for n in x]
                # a GEMM that accumulates into a kernel's result is still one GEMM
                ops += ["matmul"] * sum(isinstance(x, Accumulate) for x in items)
                gemms = sum(op in ("matmul", "matmul_t") for op in ops)
                kernels = sum(isinstance(x, Kernel) for x in items)
                way = "forward" if plan.steps[i].direction > 0 else "backward"
                rest = f", {len(ops) - gemms} other" if len(ops) > gemms else ""
                # a kernel doing the next step's first phase (fuse.rotated) runs once alone
                first = " (+1 launch before the first step)" if any(
                    isinstance(x, Kernel) and x.ahead for x in items) else ""  # fmt: skip
                print(
                    f"{kind:7s} {fname:15s} {way:9s} {gemms} GEMM + {kernels} kernel{rest}{first}"
                )


def time_rnnc(kind: str, B: int, T: int, I: int, H: int, iters: int) -> dict:
    import time

    import cupy as cp
    import numpy as np

    from rnnc.compiler import compile_spec

    m = compile_spec(os.path.join(HERE, "specs", f"{kind}_layer.rnn"), dims={"I": I, "H": H},
                     target="cupy")  # fmt: skip
    params = m.init_params(0, np.float32)
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.normal(size=(T, B, I)).astype(np.float32))
    y = cp.asarray(rng.normal(size=(T, B, H)).astype(np.float32))
    out = {}
    for what, f in (("fwd", lambda: m.loss(params, {"x": x}, {"y": y})),
                    ("f+b", lambda: m.loss_and_grads(params, {"x": x}, {"y": y}))):  # fmt: skip
        for _ in range(3):
            f()
        cp.cuda.Device().synchronize()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            f()
            cp.cuda.Device().synchronize()
            ts.append(time.perf_counter() - t0)
        out[what] = float(np.median(ts))
    return out


def time_torch(kind: str, B: int, T: int, I: int, H: int, iters: int) -> dict:
    import time

    import torch

    assert torch.backends.cudnn.is_available()
    dev = torch.device("cuda")
    net = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(I, H).to(dev)
    x = torch.randn(T, B, I, device=dev)
    y = torch.randn(T, B, H, device=dev)

    def fwd():
        with torch.no_grad():
            return ((net(x)[0] - y) ** 2).mean()

    def fb():
        net.zero_grad(set_to_none=True)
        loss = ((net(x)[0] - y) ** 2).mean()
        loss.backward()

    out = {}
    for what, f in (("fwd", fwd), ("f+b", fb)):
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            f()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        out[what] = sorted(ts)[len(ts) // 2]
    return out


def one_round(side: str, kind: str, size: tuple, iters: int) -> dict:
    args = [sys.executable, __file__, "--one", side, kind, ",".join(map(str, size)), str(iters)]
    r = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launches", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.launches:
        launches()
        return
    if a.one:
        side, kind, size, iters = a.one
        f = time_rnnc if side == "rnnc" else time_torch
        print(json.dumps(f(kind, *map(int, size.split(",")), int(iters))))
        return
    import numpy as np

    print(
        f"float32; {a.rounds} alternating rounds, each a fresh process; ratio = median of rnnc / cuDNN"
    )
    print(f"{'cell':5s} {'(B, T, I, H)':22s} {'fwd rnnc':>9s} {'fwd cuDNN':>10s} {'ratio':>6s}   "
          f"{'f+b rnnc':>9s} {'f+b cuDNN':>10s} {'ratio':>6s}")  # fmt: skip
    for kind in ("lstm", "gru"):
        for size in SIZES:
            runs = {"rnnc": [], "torch": []}
            for r in range(a.rounds):
                for side in ("rnnc", "torch") if r % 2 == 0 else ("torch", "rnnc"):
                    runs[side].append(one_round(side, kind, size, a.iters))
            row = {}
            for what in ("fwd", "f+b"):
                ours = np.array([x[what] for x in runs["rnnc"]])
                theirs = np.array([x[what] for x in runs["torch"]])
                row[what] = (np.median(ours), np.median(theirs), np.median(ours / theirs))
            f, b = row["fwd"], row["f+b"]
            print(f"{kind:5s} {size!s:22s} {f[0] * 1e3:8.2f}ms {f[1] * 1e3:9.2f}ms {f[2]:6.2f}   "
                  f"{b[0] * 1e3:8.2f}ms {b[1] * 1e3:9.2f}ms {b[2]:6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
