"""Draw validation loss from `rnnc run --train --log` files: python bench/plot_logs.py out.png a.jsonl b.jsonl"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    out, logs = sys.argv[1], sys.argv[2:]
    fig, ax = plt.subplots(figsize=(7, 4))
    for path in logs:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        pts = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        ax.plot(*zip(*pts, strict=True), lw=2, label=os.path.basename(path).rsplit(".", 1)[0])
    ax.axhline(0.167, color="gray", ls="--", lw=1, label="predict 1 (0.167)")
    ax.set_yscale("log")
    ax.set_xlabel("training step (batch 64)")
    ax.set_ylabel("validation MSE")
    ax.set_title("Adding problem, T = 100")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
