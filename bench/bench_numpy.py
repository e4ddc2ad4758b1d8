"""Generated NumPy code against hand-written NumPy (handwritten.py), in the same process,
interleaved; prints median times and the median over rounds of each round's ratio
generated / hand-written (paired within a round, so machine drift cancels).

    python bench/bench_numpy.py [--repeat 5] [--sizes all|small] [--target native] [--float64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from handwritten import IMPLS, from_spec  # noqa: E402

from rnnc.compiler import compile_spec  # noqa: E402

SIZES = [(1, 100, 64, 64), (32, 100, 256, 256), (64, 50, 512, 512), (16, 500, 128, 128)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="all")
    ap.add_argument("--cells", default="lstm,gru,rnn")
    ap.add_argument("--target", default="numpy", choices=["numpy", "native"],
                    help="the generated code's target (native: compiled loops)")  # fmt: skip
    ap.add_argument("--float64", action="store_true", help="time float64 (default float32)")
    a = ap.parse_args()
    real = np.float64 if a.float64 else np.float32
    sizes = SIZES if a.sizes == "all" else SIZES[:1]
    print(
        f"numpy {np.__version__}; {np.dtype(real).name}; target {a.target}; {a.repeat} interleaved rounds; "
        "ratio = median of per-round generated / hand-written"
    )
    print(
        f"{'cell':5s} {'(B, T, I, H)':20s} {'fwd gen':>9s} {'fwd hand':>9s} {'ratio':>6s}   {'f+b gen':>9s} {'f+b hand':>9s} {'ratio':>6s}"
    )
    for kind in a.cells.split(","):
        for B, T, I, H in sizes:
            t0 = time.perf_counter()
            m = compile_spec(
                os.path.join(HERE, "specs", f"{kind}_layer.rnn"), dims={"I": I, "H": H}, target=a.target
            )
            compile_s = time.perf_counter() - t0
            rng = np.random.default_rng(0)
            params = m.init_params(0, real)
            for k in params:
                params[k] = params[k] + rng.normal(0, 0.05, params[k].shape).astype(real)
            x = rng.normal(size=(T, B, I)).astype(real)
            y = rng.normal(size=(T, B, H)).astype(real)
            hp = from_spec(kind, params)
            hand = IMPLS[kind]
            lg, _ = m.loss_and_grads(params, {"x": x}, {"y": y})
            lh, _ = hand(hp, x, y)
            assert abs(lg - lh) <= 1e-3 * abs(lh), (kind, lg, lh)  # the same computation
            runs = {
                "fwd gen": lambda: m.loss(params, {"x": x}, {"y": y}),
                "fwd hand": lambda: hand(hp, x, y, backward=False),
                "f+b gen": lambda: m.loss_and_grads(params, {"x": x}, {"y": y}),
                "f+b hand": lambda: hand(hp, x, y),
            }
            times = {k: [] for k in runs}
            for f in runs.values():
                f()
            for r in range(a.repeat):
                order = list(runs) if r % 2 == 0 else list(runs)[::-1]
                for k in order:
                    t1 = time.perf_counter()
                    runs[k]()
                    times[k].append(time.perf_counter() - t1)
            med = {k: float(np.median(v)) for k, v in times.items()}
            ratio = {
                "fwd": float(np.median(np.array(times["fwd gen"]) / np.array(times["fwd hand"]))),
                "f+b": float(np.median(np.array(times["f+b gen"]) / np.array(times["f+b hand"]))),
            }
            print(f"{kind:5s} {(B, T, I, H)!s:20s} {med['fwd gen'] * 1e3:8.1f}ms {med['fwd hand'] * 1e3:8.1f}ms "
                  f"{ratio['fwd']:6.2f}   {med['f+b gen'] * 1e3:8.1f}ms {med['f+b hand'] * 1e3:8.1f}ms "
                  f"{ratio['f+b']:6.2f}   (compile {compile_s:.2f}s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
