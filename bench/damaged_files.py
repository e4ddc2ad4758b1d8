"""Damaged files in bulk: random bytes, truncations and bit flips of a real checkpoint and a
real data file, each handed to `rnnc run`; counts the outcomes by exit code and error code.
An exit 3 (internal error) is a bug. Usage: python bench/damaged_files.py [N] [SEED]"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from rnnc.cli import main

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")
TRAIN = ["run", os.path.join(SPECS, "adding_rnn.rnn"), "--train", "--task", "adding", "--quiet",
         "--dim", "H=8", "--seq-len", "6", "--batch", "4"]  # fmt: skip
ELMAN = os.path.join(SPECS, "elman.rnn")


def quiet(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return code, err.getvalue()


def damaged(raw: bytes, kind: str, rng) -> bytes:
    if kind == "random":
        return rng.bytes(int(rng.integers(0, 300)))
    if kind == "truncated":
        return raw[: int(rng.random() * len(raw))]
    out = bytearray(raw)
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(0, len(out)))
        out[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def main_(n: int, seed: int) -> int:
    d = tempfile.mkdtemp()
    ck, data = os.path.join(d, "ck.npz"), os.path.join(d, "d.npz")
    assert quiet([*TRAIN, "--steps", "2", "--checkpoint", ck])[0] == 0
    rng = np.random.default_rng(seed)
    np.savez(data, x=rng.normal(size=(5, 2, 27)), y=rng.integers(0, 27, (5, 2)),
             **{"x.lengths": np.array([5, 3])})  # fmt: skip
    originals = {w: Path(p).read_bytes() for w, p in (("checkpoint", ck), ("data", data))}
    counts: collections.Counter = collections.Counter()
    path = os.path.join(d, "f.npz")
    for i in range(n):
        which, kind = ("checkpoint", "data")[i % 2], ("random", "truncated", "flipped")[(i // 2) % 3]
        with open(path, "wb") as f:
            f.write(damaged(originals[which], kind, rng))
        args = [*TRAIN, "--steps", "3", "--resume", "--checkpoint", path] if which == "checkpoint" \
            else ["run", ELMAN, "--data", path]  # fmt: skip
        code, err = quiet(args)
        found = re.search(r"error\[(E\d+)\]", err)
        counts[(which, kind, code, found.group(1) if found else "-")] += 1
        if code not in (0, 1):
            print(err)
    for key, c in sorted(counts.items(), key=str):
        print(f"{key[0]:10s} {key[1]:9s} exit {key[2]}  {key[3]:5s} {c:6d}")
    bugs = sum(c for k, c in counts.items() if k[2] not in (0, 1))
    refused = sum(c for k, c in counts.items() if k[2] == 1)
    print(f"{n} damaged files: {refused} refused in words, {n - refused - bugs} read as valid "
          f"(a flip in a field no reader uses), {bugs} internal errors")
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main_(int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
                   int(sys.argv[2]) if len(sys.argv) > 2 else 0))  # fmt: skip
