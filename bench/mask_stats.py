"""Dropout and zoneout masks as training draws them: their mean, the fraction dropped (or
kept, for zoneout), and for per-step masks the correlation between one step's and the next.
A per=sequence mask has no time axis: one mask per sequence, the same at every step.

    python bench/mask_stats.py
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rnnc.compiler import compile_spec

ROOT = os.path.join(os.path.dirname(__file__), "..")

if __name__ == "__main__":
    T, B = 100, 256
    for spec in ("lstm_dropout.rnn", "lstm_zoneout.rnn"):
        m = compile_spec(os.path.join(ROOT, "specs", spec))
        inputs = {k: np.zeros((B, *s) if d == "static" else (T, B, *s)) for k, (s, d, _) in m.inputs.items()}
        print(f"{spec} (T={T}, B={B}, seed 0):")
        for name, a in m.draw_masks(inputs, np.random.default_rng(0)).items():
            _, _, kind, p = m.masks[name]
            share = (a == 0).mean() if kind == "dropout" else a.mean()
            line = (f"  {name}: {kind}(p={p}) {list(a.shape)} mean {a.mean():.4f}, "
                    f"{'dropped' if kind == 'dropout' else 'kept'} {share:.4f}")  # fmt: skip
            if a.ndim == 3:  # a fresh mask each step
                now, nxt = (a[:-1] != 0).ravel(), (a[1:] != 0).ravel()
                line += f", step-to-step correlation {np.corrcoef(now, nxt)[0, 1]:+.4f}"
            print(line)
