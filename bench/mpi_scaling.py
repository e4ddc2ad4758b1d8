"""Data-parallel training on this machine, and on paper for a cluster.

Measured: tokens per second of `rnnc run --train` (the Trainer) on 1 and 2 MPI processes, with
the all-reduce's share of a step. On paper: for each model and size of docs/benchmarks.md, the
bytes one step all-reduces (parameters x 4 in float32; a ring all-reduce moves 2(N-1)/N of them
per rank) against the compute of one step on B/N sequences (measured here on one process at B,
divided by N), and the N from which communication takes longer than computing.

    python bench/mpi_scaling.py               # both parts (needs mpi4py and mpiexec)
    python bench/mpi_scaling.py --paper       # the estimate only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SPECS = os.path.join(HERE, "specs")
SIZES = [(1, 100, 64, 64), (32, 100, 256, 256), (64, 50, 512, 512), (16, 500, 128, 128)]
LINKS = {"shared memory (measured here)": None, "100 Gb/s InfiniBand": 12.5e9, "10 Gb/s Ethernet": 1.25e9}
LATENCY = 2e-6  # seconds per message hop on InfiniBand (an order of magnitude; Ethernet ~20 us)


def worker(spec: str, steps: int, B: int, T: int, H: int) -> None:
    """Run under mpiexec: train, print one JSON line from rank 0."""
    import rnnc
    from rnnc import train
    from rnnc.parallel import world

    comm = world()
    m = rnnc.compile(spec, dims={"H": H})
    t = train.Trainer(m, train.Task("adding", B, T), train.Adam(1e-3), steps=steps, comm=comm,
                      validate_every=10**9)  # fmt: skip
    t.fit()
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "tokens_per_s": t.tokens / t.seconds,
                          "step_ms": 1e3 * t.seconds / steps,
                          "allreduce_share": comm.seconds / t.seconds}))  # fmt: skip


def measured(mpiexec: str, spec: str, B: int, T: int, H: int, steps: int, rounds: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    print(f"\n{os.path.basename(spec)}, B={B}, T={T}, H={H}, {steps} steps; one BLAS thread per "
          f"process; median of {rounds} interleaved rounds")  # fmt: skip
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(rounds):
        for n in runs:
            cmd = [mpiexec, "-n", str(n), sys.executable, __file__, "--worker", spec, str(steps),
                   str(B), str(T), str(H)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            runs[n].append(json.loads(out.strip().splitlines()[-1]))
    base = np.median([r["tokens_per_s"] for r in runs[1]])
    for n, rs in runs.items():
        tok = np.median([r["tokens_per_s"] for r in rs])
        share = np.median([r["allreduce_share"] for r in rs])
        step = np.median([r["step_ms"] for r in rs])
        print(f"  {n} process{'es' if n > 1 else '  '}: {tok:10,.0f} tokens/s ({tok / base:.2f}x), "
              f"{step:6.1f} ms/step, all-reduce {100 * share:4.1f}% of the time")


def allreduce_bandwidth(mpiexec: str) -> float:
    """Bytes per second of a 2-process Allreduce of 64 MiB on this machine (bus bandwidth)."""
    code = ("from mpi4py import MPI; import numpy as np, time; c = MPI.COMM_WORLD; "
            "a = np.ones(16 * 2**20, np.float32); c.Allreduce(MPI.IN_PLACE, a); c.Barrier(); "
            "t = time.perf_counter(); [c.Allreduce(MPI.IN_PLACE, a) for _ in range(5)]; "
            "dt = (time.perf_counter() - t) / 5; "
            "c.rank or print(a.nbytes * 2 * (c.size - 1) / c.size / dt)")  # fmt: skip
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return float(out.strip())


def step_timer(cell: str, T: int, I: int, H: int):
    """(parameter count, seconds(b) of one loss-and-gradients call at batch b) on this process,
    for the benchmark table's layer specs (bench/specs/<cell>_layer.rnn); memoized per b."""
    from rnnc.compiler import compile_spec

    m = compile_spec(os.path.join(SPECS, f"{cell}_layer.rnn"), dims={"I": I, "H": H})
    p = m.init_params(0, np.float32)
    cache: dict[int, float] = {}

    def seconds(b: int) -> float:
        if b not in cache:
            rng = np.random.default_rng(0)
            x = rng.normal(size=(T, b, I)).astype(np.float32)
            y = rng.normal(size=(T, b, H)).astype(np.float32)
            m.loss_and_grads(p, {"x": x}, {"y": y})
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                m.loss_and_grads(p, {"x": x}, {"y": y})
                ts.append(time.perf_counter() - t0)
            cache[b] = float(np.median(ts))
        return cache[b]

    return sum(v.size for v in p.values()), seconds


def paper(bandwidth_here: float | None) -> None:
    links = dict(LINKS)
    links["shared memory (measured here)"] = bandwidth_here
    print("\nOn paper: one step of data-parallel training at a fixed global batch B over N ranks."
          "\ncompute(N) = f+b measured on one process at batch ceil(B/N) (per-call overhead does"
          " not shrink with the batch);\ncomm(N) = 2(N-1)/N x 4 x params / bandwidth"
          f" + 2(N-1) x {LATENCY * 1e6:.0f} us")  # fmt: skip
    print(f"{'cell':5s} {'(B, T, I, H)':18s} {'params':>9s} {'MB/step':>8s} {'f+b':>8s}   "
          + "   ".join(f"N* {k.split(' (')[0]}" for k, v in links.items() if v)
          + "   best speedup (N) on InfiniBand")  # fmt: skip
    for cell in ("lstm", "gru", "rnn"):
        for B, T, I, H in SIZES:
            n_params, seconds = step_timer(cell, T, I, H)
            t = seconds(B)

            def comm(n: int, bw: float) -> float:
                return 2 * (n - 1) / n * 4 * n_params / bw + 2 * (n - 1) * LATENCY

            crossover = []
            for bw in links.values():
                if not bw:
                    continue
                n = next((n for n in range(2, B + 1) if comm(n, bw) > seconds(-(-B // n))), None)
                crossover.append(f"{n if n else f'>{B}':>6}")
            ib = links["100 Gb/s InfiniBand"]
            speed = {n: t / (seconds(-(-B // n)) + comm(n, ib)) for n in range(1, B + 1)}
            best = max(speed, key=speed.get)
            print(f"{cell:5s} {(B, T, I, H)!s:18s} {n_params:9,d} {4 * n_params / 1e6:8.2f} "
                  f"{t * 1e3:6.1f}ms   " + "   ".join(crossover)
                  + f"   {speed[best]:5.1f}x ({best})")  # fmt: skip
    print("N*: the smallest N <= B at which the all-reduce takes longer than a rank's compute"
          " (>B: never, within the batch).\nbest speedup: (f+b at B) / (f+b at ceil(B/N) + comm),"
          " maximized over N <= B, with no overlap of communication and compute.")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        spec, steps, B, T, H = sys.argv[2], *map(int, sys.argv[3:7])
        worker(spec, steps, B, T, H)
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--paper", action="store_true", help="only the estimate")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    mpiexec = shutil.which("mpiexec")
    bw = None
    if not a.paper:
        if mpiexec is None:
            print("no mpiexec: pip install 'rnnc[mpi]'")
            return 1
        spec = os.path.join(HERE, "..", "specs", "adding_lstm.rnn")
        for B, T, H, steps in ((64, 50, 128, 30), (8, 50, 32, 200)):
            measured(mpiexec, os.path.normpath(spec), B, T, H, steps, a.rounds)
        bw = allreduce_bandwidth(mpiexec)
        print(f"\nAllreduce of 64 MiB between 2 processes here: {bw / 1e9:.2f} GB/s (bus bandwidth)")
    paper(bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
