"""What a .rnn cell costs inside PyTorch: rnnc.torch.Module against the same LSTM as
torch.nn.LSTM, as a PyTorch Python loop, and as that loop under torch.compile. A training
step (forward, sum of squares, backward) in float32; each variant in its own process with
torch's default threading, rounds interleaved, the median per variant; every variant's
output checked against nn.LSTM with the same weights first.

    python bench/torch_module.py [--batch 32 --steps 100 --size 256 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["nn.LSTM", "rnnc.torch.Module", "Module(target='native')", "Module(recompute=True)",
            "Module(remat=10)", "python loop", "torch.compile(loop)"]  # fmt: skip
SPEC = "use LSTM\n\nmodel m {{\n  dim I = {I}, H = {H}\n  input x[I] : sequence\n  h = LSTM(x, H=H)\n}}\n"


def build(variant: str, B: int, T: int, N: int):
    import torch

    sys.path.insert(0, os.path.join(HERE, ".."))
    import rnnc.torch as rt

    torch.manual_seed(0)
    ref = torch.nn.LSTM(N, N)
    if variant == "nn.LSTM":
        return ref, lambda x: ref(x)[0]
    if variant.startswith(("rnnc.torch.Module", "Module(")):
        cell = rt.Module(SPEC.format(I=N, H=N), recompute="recompute" in variant,
                         target="native" if "native" in variant else None,
                         remat=10 if "remat" in variant else None)  # fmt: skip
        with torch.no_grad():
            for name, p in cell.named_rnnc_parameters().items():
                p.copy_(getattr(ref, name.split(".")[1] + "_l0"))
        return ref, cell
    W_ih, W_hh = ref.weight_ih_l0, ref.weight_hh_l0
    b = ref.bias_ih_l0 + ref.bias_hh_l0

    def loop(x):
        h = c = x.new_zeros(x.shape[1], N)
        xs = x @ W_ih.T + b  # the input projection for all steps at once, as a careful person writes
        out = []
        for t in range(x.shape[0]):
            z = xs[t] + h @ W_hh.T
            i, f, g, o = z.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out)

    return ref, (torch.compile(loop) if variant == "torch.compile(loop)" else loop)


def worker(variant: str, B: int, T: int, N: int, iters: int) -> None:
    import torch

    ref, f = build(variant, B, T, N)
    x = torch.randn(T, B, N, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = float((f(x) - ref(x)[0]).abs().max())
    t0 = time.perf_counter()
    f(x).square().sum().backward()  # warm-up (and, for torch.compile, compiling)
    first = time.perf_counter() - t0
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f(x).square().sum().backward()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    print(json.dumps({"variant": variant, "ms": 1e3 * ts[len(ts) // 2], "first_ms": 1e3 * first,
                      "max_abs_diff_vs_nn_lstm": err}))  # fmt: skip


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], *map(int, sys.argv[3:7]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(a.rounds):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--worker", v, str(a.batch), str(a.steps),
                                  str(a.size), str(a.iters)], capture_output=True, text=True)  # fmt: skip
            if out.returncode != 0:
                print(f"{v}: failed\n{out.stderr[-2000:]}")
                return 1
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = sorted(r["ms"] for r in runs["nn.LSTM"])[a.rounds // 2]
    print(f"LSTM, B={a.batch}, T={a.steps}, I=H={a.size}, float32, a training step (forward + backward); "
          f"median of {a.rounds} rounds x {a.iters} steps")  # fmt: skip
    print(f"{'variant':22s} {'ms/step':>9s} {'vs nn.LSTM':>11s} {'first call':>11s} {'|out - nn.LSTM|':>16s}")
    for v, rs in runs.items():
        ms = sorted(r["ms"] for r in rs)[a.rounds // 2]
        first = sorted(r["first_ms"] for r in rs)[a.rounds // 2]
        diff = max(r["max_abs_diff_vs_nn_lstm"] for r in rs)
        print(f"{v:22s} {ms:9.1f} {ms / base:10.2f}x {first:10.0f}ms {diff:16.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
