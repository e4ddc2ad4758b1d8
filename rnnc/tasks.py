"""Built-in training data, generated or found on the machine — nothing downloaded.

Each task yields batches as (inputs, targets, lengths) dicts laid out [T, B, ...]:
  adding  the adding problem (Hochreiter & Schmidhuber 1997): x[t] = (value, marker);
          target: the sum of the two marked values. Predicting 1 scores MSE 0.167.
  copy    copy memory: 10 symbols, a pause, a cue; then reproduce the symbols.
  reber   the embedded Reber grammar: predict the next symbol (variable lengths).
  reverse sequence to sequence: a string of 1..T digits (input src) written backwards, then an
          end token; the decoder reads a start token and its own previous outputs (tgt_in)
          and predicts tgt_out. Source and target have lengths of their own.
  text    a character language model on a text file (default: Python's own documentation
          topics, pydoc_data, which every CPython carries).
  npz     the user's arrays: one per input and target, optional `<domain>.lengths`.
"""

from __future__ import annotations

import numpy as np

from .errors import RnncError


def adding_batch(rng, T: int, B: int):
    x = np.zeros((T, B, 2))
    x[:, :, 0] = rng.random((T, B))
    first = rng.integers(0, max(T // 2, 1), B)
    second = rng.integers(T // 2, T, B) if T > 1 else first
    second = np.where(second == first, (first + 1) % T, second)
    x[first, np.arange(B), 1] = 1
    x[second, np.arange(B), 1] = 1
    total = x[first, np.arange(B), 0] + x[second, np.arange(B), 0]
    return {"x": x}, {"sum": total[:, None]}, None


COPY_SYMBOLS = 8  # symbols 0..7; 8 = blank, 9 = cue


def copy_batch(rng, T: int, B: int, n: int = 10):
    """Input one-hot [T+2n, B, 10]; target class per step: blank, then the n symbols."""
    total = T + 2 * n
    seq = rng.integers(0, COPY_SYMBOLS, (n, B))
    x = np.full((total, B), COPY_SYMBOLS)
    x[:n] = seq
    x[n + T - 1] = COPY_SYMBOLS + 1
    y = np.full((total, B), COPY_SYMBOLS)
    y[n + T :] = seq
    return {"x": np.eye(COPY_SYMBOLS + 2)[x]}, {"y": y}, None


DIGITS, START, END = 10, 10, 11  # tokens: 0..9, then the start and end marks (V = 12)


def reverse_batch(rng, T: int, B: int):
    """Digit strings of 1..T digits, one-hot; the target is the string reversed plus END,
    fed to the decoder after START (teacher forcing)."""
    L = rng.integers(1, T + 1, B)
    digits = rng.integers(0, DIGITS, (T, B))
    src = np.zeros((T, B, DIGITS + 2))
    tgt_in = np.zeros((T + 1, B, DIGITS + 2))
    tgt_out = np.zeros((T + 1, B), dtype=np.int64)
    for b in range(B):
        s = digits[: L[b], b]
        src[np.arange(L[b]), b, s] = 1
        out = [*s[::-1], END]
        tgt_out[: L[b] + 1, b] = out
        tgt_in[np.arange(L[b] + 1), b, [START, *out[:-1]]] = 1
    return {"src": src, "tgt_in": tgt_in}, {"tgt_out": tgt_out}, {"src": L, "tgt_in": L + 1}


REBER = "BTSXPVE"
REBER_EDGES = {0: [("T", 1), ("P", 2)], 1: [("S", 1), ("X", 3)], 2: [("T", 2), ("V", 4)],
               3: [("X", 2), ("S", 5)], 4: [("P", 3), ("V", 5)]}  # fmt: skip


def reber_string(rng) -> str:
    s, state = "B", 0
    while state != 5:
        sym, state = REBER_EDGES[state][rng.integers(2)]
        s += sym
    return s + "E"


def embedded_reber(rng) -> str:
    branch = "TP"[rng.integers(2)]
    return "B" + branch + reber_string(rng) + branch + "E"


def reber_batch(rng, B: int):
    """Next-symbol prediction over embedded Reber strings, padded, with their lengths."""
    strings = [embedded_reber(rng) for _ in range(B)]
    T = max(len(s) for s in strings) - 1
    x = np.zeros((T, B, len(REBER)))
    y = np.zeros((T, B), dtype=np.int64)
    lengths = np.array([len(s) - 1 for s in strings])
    for b, s in enumerate(strings):
        for t in range(len(s) - 1):
            x[t, b, REBER.index(s[t])] = 1
            y[t, b] = REBER.index(s[t + 1])
    return {"x": x}, {"y": y}, lengths


def default_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - every CPython ships it
        raise RnncError("Python's pydoc_data is missing; pass --text FILE", code="E530") from e
    return "\n".join(topics[k] for k in sorted(topics))


class Text:
    """A character stream over a text, as one-hot inputs and next-character targets."""

    def __init__(self, text: str, max_vocab: int = 96):
        if len(text) < 100:
            raise RnncError("the text is too short to train on (under 100 characters)", code="E531")
        counts: dict[str, int] = {}
        for ch in text:
            counts[ch] = counts.get(ch, 0) + 1
        keep = sorted(sorted(counts, key=lambda c: -counts[c])[: max_vocab - 1])
        self.chars = ["\x00", *keep]  # 0: any rarer character
        index = {c: i for i, c in enumerate(self.chars)}
        self.ids = np.array([index.get(c, 0) for c in text], dtype=np.int64)
        self.vocab = len(self.chars)
