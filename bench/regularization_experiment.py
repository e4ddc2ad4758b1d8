"""Does variational dropout (and zoneout) close the train/validation gap of a character LSTM?

The same LSTM three ways — plain (specs/lstm.rnn), with variational dropout
(specs/lstm_dropout.rnn) and with zoneout (specs/lstm_zoneout.rnn) — trained on the first
--chars characters of the built-in text (95% to train on, the last 5% held out), same seed,
steps and optimizer. Every --every steps, bits per character in evaluation mode (no masks)
on a fixed set of training windows and on every held-out window, each window starting from
a zero state. Prints a markdown table, writes the curves as JSON and, with matplotlib, a plot.

    python bench/regularization_experiment.py                    # ~10 minutes on 2 cores
    python bench/regularization_experiment.py --steps 300 --chars 20000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from rnnc import tasks, train  # noqa: E402
from rnnc.compiler import compile_spec  # noqa: E402

SPECS = {"plain": "lstm.rnn", "variational dropout": "lstm_dropout.rnn", "zoneout": "lstm_zoneout.rnn"}


def windows(ids: np.ndarray, start: int, stop: int, T: int, n: int | None, rng) -> np.ndarray:
    """[T + 1, n] character ids: n windows of T + 1 characters inside [start, stop) (all of
    them, end to end, when n is None)."""
    if n is None:
        starts = np.arange(start, stop - T - 1, T)
    else:
        starts = rng.integers(start, stop - T - 1, n)
    return ids[starts[None, :] + np.arange(T + 1)[:, None]]


def bits_per_char(m, params, w: np.ndarray, V: int, batch: int = 256) -> float:
    """Evaluation-mode cross-entropy in bits per character over windows w [T + 1, n]."""
    T, total, count = w.shape[0] - 1, 0.0, 0
    for i in range(0, w.shape[1], batch):
        part = w[:, i : i + batch]
        loss = m.loss(params, {"x": np.eye(V)[part[:-1]]}, {"y": part[1:]})["loss"]  # mean over the batch
        total += float(loss) * part.shape[1]
        count += part.shape[1] * T
    return total / count / math.log(2)


def run(name: str, text: str, a) -> dict:
    task = train.Task("text", a.batch, a.seq_len, text=text)
    m = compile_spec(os.path.join(HERE, "..", "specs", SPECS[name]), dims={"H": a.hidden, **task.dims()})
    ids, V = task.text.ids, task.text.vocab
    split = int(len(ids) * 0.95)
    rng = np.random.default_rng(123)
    train_w = windows(ids, 0, split, a.seq_len, 512, rng)
    val_w = windows(ids, split, len(ids), a.seq_len, None, rng)
    curve = []

    def measure(t: train.Trainer, r: train.Record) -> None:
        if r.step % a.every == 0 or r.step == a.steps:
            curve.append({"step": r.step, "train_bpc": bits_per_char(m, t.params, train_w, V),
                          "val_bpc": bits_per_char(m, t.params, val_w, V)})  # fmt: skip

    t0 = time.perf_counter()
    t = train.Trainer(m, task, train.Adam(a.lr), steps=a.steps, seed=a.seed, validate_every=10**9,
                      callbacks=[measure])  # fmt: skip
    t.fit()
    best = min(curve, key=lambda c: c["val_bpc"])
    return {"name": name, "curve": curve, "seconds": time.perf_counter() - t0, "best": best,
            "final": curve[-1], "train_windows": train_w.shape[1], "val_windows": val_w.shape[1]}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chars", type=int, default=100_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "regularization"))
    a = ap.parse_args()
    text = tasks.default_text()[: a.chars]
    results = [run(name, text, a) for name in SPECS]
    print(f"\nH={a.hidden}, {a.chars:,d} characters (95% train), batch {a.batch} x {a.seq_len}, "
          f"Adam {a.lr:g}, {a.steps} steps, seed {a.seed}; bits per character in evaluation mode")  # fmt: skip
    print("\n| model | final train | final validation | gap | best validation (step) | train at best | time |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        f, b = r["final"], r["best"]
        print(f"| {r['name']} | {f['train_bpc']:.3f} | {f['val_bpc']:.3f} | {f['val_bpc'] - f['train_bpc']:+.3f} "
              f"| {b['val_bpc']:.3f} ({b['step']}) | {b['train_bpc']:.3f} | {r['seconds']:.0f} s |")  # fmt: skip
    with open(a.out + ".json", "w") as f:
        json.dump({"settings": vars(a), "results": results}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: no plot)")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, color in zip(results, ("C0", "C1", "C2"), strict=True):
        steps = [c["step"] for c in r["curve"]]
        ax.plot(steps, [c["train_bpc"] for c in r["curve"]], "--", color=color, label=f"{r['name']}: train")
        ax.plot(steps, [c["val_bpc"] for c in r["curve"]], "-", color=color, label=f"{r['name']}: validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character (evaluation mode)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=110)
    print(f"wrote {a.out}.png and {a.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
