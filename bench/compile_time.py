"""What the native target's compiling costs a user: import, compile_spec and the first call of
a spec's function, each run in a fresh process, with a cold disk cache (a new temporary folder,
so numba compiles every loop) and then warm (the loops just compiled, loaded from disk).

    python bench/compile_time.py [--spec bench/specs/lstm_layer.rnn] [--fn loss_and_grads] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from rnnc.compiler import compile_spec
spec, fn, dims = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
m = compile_spec(spec, target="native", dims=dims)
t1 = time.perf_counter()
rng = np.random.default_rng(0)
p = m.init_params(0, np.float32)
x = rng.normal(size=(10, 4, dims["I"])).astype(np.float32)
y = rng.normal(size=(10, 4, dims["H"])).astype(np.float32)
args = (p, {"x": x}) if fn == "forward" else (p, {"x": x}, {"y": y})
getattr(m, fn)(*args)
t2 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "first": t2 - t1}))
"""


def run(spec: str, fn: str, dims: dict, cache: str) -> dict:
    env = dict(os.environ, TMPDIR=cache)  # rnnc keeps generated modules (and numba their code) there
    out = subprocess.run([sys.executable, "-c", CHILD, spec, fn, json.dumps(dims)], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=os.path.join(HERE, "specs", "lstm_layer.rnn"))
    ap.add_argument("--fn", default="loss_and_grads", choices=["forward", "loss", "loss_and_grads"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dims", default="I=256,H=256")
    a = ap.parse_args()
    dims = {k: int(v) for k, v in (kv.split("=") for kv in a.dims.split(","))}
    print(f"{os.path.basename(a.spec)} {a.fn} {dims}, native target; seconds in a fresh process")
    print(f"{'run':5s} {'cache':5s} {'import+compile_spec':>20s} {'first call':>11s} {'total':>6s}")
    for i in range(a.runs):
        with tempfile.TemporaryDirectory() as cache:
            for kind in ("cold", "warm"):
                r = run(a.spec, a.fn, dims, cache)
                print(f"{i + 1:<5d} {kind:5s} {r['load']:20.2f} {r['first']:11.2f} {r['load'] + r['first']:6.2f}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
