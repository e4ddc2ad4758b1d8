"""Does attention help an encoder-decoder reverse digit strings? And does beam search help?

The built-in `reverse` task (rnnc/tasks.py): a string of 1..T digits, to be written backwards
and ended. Three models, same hidden size, optimizer, batches and steps:
  plain      specs/encoder_decoder.rnn: LSTMs, the decoder starts from the encoder's final state
  additive   specs/attention_additive.rnn: a GRU encoder, a tanh decoder attending (Bahdanau)
  dot        specs/attention_dot.rnn: LSTMs, dot-product attention with input feeding (Luong)
Each is then decoded (rnnc.decode: greedy, and beam search of width --width) on a fixed test
set of --per strings of each length 1..T, drawn apart from the training batches; exact-match
accuracy by length. Prints markdown tables and writes the numbers as JSON.

    python bench/attention_experiment.py                 # ~10 minutes on 2 cores
    python bench/attention_experiment.py --steps 300 --per 10   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from rnnc import tasks, train  # noqa: E402
from rnnc.compiler import compile_spec  # noqa: E402
from rnnc.decode import decode  # noqa: E402

SPECS = {"plain": "encoder_decoder.rnn", "additive": "attention_additive.rnn", "dot": "attention_dot.rnn"}


def test_set(T: int, per: int, seed: int) -> dict[int, np.ndarray]:
    """length -> [per, length] digit strings."""
    rng = np.random.default_rng(seed)
    return {L: rng.integers(0, tasks.DIGITS, (per, L)) for L in range(1, T + 1)}


def accuracy(m, params, strings: np.ndarray, method: str, width: int) -> float:
    """The share of strings decoded exactly (their reverse, then the end token)."""
    n, L = strings.shape
    src = np.zeros((L, n, tasks.DIGITS + 2))
    src[np.arange(L)[:, None], np.arange(n)[None, :], strings.T] = 1
    out = decode(m, params, L + 1, np.full((n, 1), tasks.START), static={"src": src},
                 lengths={"src": np.full(n, L)}, method=method, width=width, end=tasks.END)  # fmt: skip
    want = [[*s[::-1].tolist(), tasks.END] for s in strings]
    return float(np.mean([got == w for got, w in zip(out.tokens, want, strict=True)]))


def run(name: str, a, tests) -> dict:
    task = train.Task("reverse", a.batch, a.max_len)
    m = compile_spec(os.path.join(HERE, "..", "specs", SPECS[name]), dims={"H": a.hidden, **task.dims()})
    t0 = time.perf_counter()
    losses: list[float] = []
    t = train.Trainer(m, task, train.Adam(a.lr), steps=a.steps, seed=a.seed, validate_every=10**9,
                      callbacks=[lambda t, r: losses.append(r.loss)])  # fmt: skip
    t.fit()
    seconds = time.perf_counter() - t0
    params = {k: np.asarray(v, np.float64) for k, v in t.params.items()}
    row = {"name": name, "train_seconds": seconds, "final_loss": float(np.mean(losses[-100:]))}
    for method in ("greedy", "beam"):
        t1 = time.perf_counter()
        row[method] = {L: accuracy(m, params, s, method, a.width) for L, s in tests.items()}
        row[method + "_seconds"] = time.perf_counter() - t1
    print(f"{name}: trained in {seconds:.0f} s, final loss {row['final_loss']:.2g}", file=sys.stderr)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--per", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "attention.json"))
    a = ap.parse_args()
    tests = test_set(a.max_len, a.per, seed=10_000 + a.seed)
    rows = [run(name, a, tests) for name in SPECS]
    lengths = list(tests)
    print(f"\nreverse, 1..{a.max_len} digits; H={a.hidden}, batch {a.batch}, Adam {a.lr:g}, {a.steps} steps, "
          f"seed {a.seed}; exact match over {a.per} test strings per length")  # fmt: skip
    for method in ("greedy", "beam"):
        label = "greedy" if method == "greedy" else f"beam search, width {a.width}"
        print(f"\n{label}:\n")
        print("| model | " + " | ".join(str(L) for L in lengths) + " | all |")
        print("|---|" + "---|" * (len(lengths) + 1))
        for r in rows:
            accs = [r[method][L] for L in lengths]
            print(f"| {r['name']} | " + " | ".join(f"{x:.2f}" for x in accs) + f" | {np.mean(accs):.3f} |")
    print("\n| model | training | final loss | greedy decoding | beam decoding |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['train_seconds']:.0f} s | {r['final_loss']:.2g} | {r['greedy_seconds']:.1f} s "
              f"| {r['beam_seconds']:.1f} s |")  # fmt: skip
    with open(a.out, "w") as f:
        json.dump({"settings": vars(a), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
