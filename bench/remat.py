"""Checkpointing over time (rnnc.remat) against plain BPTT: the time of a training step
(loss_and_grads) and its peak memory, for growing sequence lengths.

Both variants run in this process, rounds interleaved, median per variant; the peak is what
NumPy allocated during one call (tracemalloc traces NumPy's buffers), measured in a separate
untimed call; the estimate is rnnc.memory's for the same step. The gradients of the two are
compared first (float32 here; the tests check float64 to 1e-12).

    python bench/remat.py [--spec bench/specs/lstm_layer.rnn --dims I=256,H=256 --batch 32
                           --steps 100,400,1600 --rounds 3 --target numpy]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from rnnc.compiler import compile_spec, parse_dims  # noqa: E402
from rnnc.memory import estimate, fmt_bytes  # noqa: E402
from rnnc.remat import window_length  # noqa: E402


def batch(m, T: int, B: int, rng) -> tuple[dict, dict]:
    def draw(table):
        out = {}
        for k, (shape, dom, labels) in table.items():
            if k.endswith(".init"):
                continue
            lead = (B,) if dom == "static" else (T, B)
            out[k] = rng.integers(0, shape[-1] if shape else 2, lead) if labels else \
                rng.standard_normal(lead + tuple(shape)).astype(np.float32)  # fmt: skip
        return out

    return draw(m.inputs), draw(m.targets)


def peak(f) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    f()
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=os.path.join(HERE, "specs", "lstm_layer.rnn"))
    ap.add_argument("--dims", default="I=256,H=256")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", default="100,400,1600")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target", default="numpy", choices=["numpy", "native"])
    a = ap.parse_args()
    m = compile_spec(a.spec, target=a.target, dims=parse_dims(a.dims.split(",")))
    p = m.init_params(0, np.float32)
    rng = np.random.default_rng(0)
    print(f"{os.path.basename(a.spec)} ({a.dims}), B={a.batch}, float32, target {a.target}; "
          f"median of {a.rounds} rounds; peak = NumPy's allocations during one call")  # fmt: skip
    print(f"{'T':>6} {'window':>6} {'plain ms':>9} {'remat ms':>9} {'time x':>7} "
          f"{'plain peak':>11} {'remat peak':>11} {'memory x':>8} {'estimate plain/remat':>24} {'max diff':>9}")  # fmt: skip
    for T in map(int, a.steps.split(",")):
        ins, tgs = batch(m, T, a.batch, rng)
        k = window_length(T)
        plain = lambda: m.loss_and_grads(p, ins, tgs)  # noqa: E731
        remat = lambda: m.loss_and_grads(p, ins, tgs, remat=k)  # noqa: E731
        (_, g0), (_, g1) = plain(), remat()  # warm (and the native target's compile)
        diff = max(float(np.abs(g0[n] - g1[n]).max() / (np.abs(g0[n]).max() + 1e-30)) for n in g0)
        times: dict[str, list[float]] = {"plain": [], "remat": []}
        for r in range(a.rounds):
            for name, f in (("plain", plain), ("remat", remat))[:: 1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        tp, tr = (statistics.median(times[n]) * 1e3 for n in ("plain", "remat"))
        pp, pr = peak(plain), peak(remat)
        ep = estimate(m, T, a.batch, np.float32).activations
        er = estimate(m, T, a.batch, np.float32, window=k).activations
        print(f"{T:6d} {k:6d} {tp:9.1f} {tr:9.1f} {tr / tp:7.2f} {fmt_bytes(pp):>11} {fmt_bytes(pr):>11} "
              f"{pr / pp:8.3f} {fmt_bytes(ep) + ' / ' + fmt_bytes(er):>24} {diff:9.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
