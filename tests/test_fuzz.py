"""Random text and random mutations of the specs: `rnnc check` succeeds or gives a located
error with exit 1 — never an uncaught exception (exit 3)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from rnnc.cli import main

HERE = os.path.dirname(__file__)
SPECS = [Path(p).read_text() for p in sorted(glob.glob(os.path.join(HERE, "..", "specs", "*.rnn")))]
COUNT = {"inputs": 0}


def run_check(tmp_path, text: str) -> None:
    path = tmp_path / "fuzz.rnn"
    path.write_text(text, encoding="utf-8")
    code = main(["check", str(path)])
    COUNT["inputs"] += 1
    assert code in (0, 1), f"exit {code} for:\n{text}"


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SPECS))
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "rename", "insert"]))
        if kind in ("delete", "duplicate", "insert") and text:
            i = draw(st.integers(0, len(text) - 1))
            if kind == "delete":
                text = text[:i] + text[i + 1 :]
            elif kind == "duplicate":
                text = text[:i] + text[i] + text[i:]
            else:
                text = text[:i] + draw(st.sampled_from(list("()[]{}=+-*@,:#t1xH\n "))) + text[i:]
        elif kind == "swap" and len(lines) > 2:
            lines = text.splitlines()
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines) + "\n"
        elif kind == "rename":
            words = sorted(set(w for w in text.replace("(", " ").split() if w.isidentifier()))
            if words:
                w = draw(st.sampled_from(words))
                text = text.replace(
                    w, draw(st.sampled_from(["q", "t", "model", "H", "x1", w + w])), 1
                )
    return text


@settings(max_examples=150)
@given(mutated())
def test_mutated_specs_never_crash(tmp_path_factory, text):
    run_check(tmp_path_factory.mktemp("f"), text)


@settings(max_examples=100)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=200))
def test_random_text_never_crashes(tmp_path_factory, text):
    run_check(tmp_path_factory.mktemp("f"), text)


def test_deep_nesting_is_a_located_error(tmp_path):
    text = (
        "model m {\n  dim H = 2\n  input x[H] : sequence\n  s = "
        + "tanh(" * 3000
        + "x"
        + ")" * 3000
        + "\n}\n"
    )
    run_check(tmp_path, text)
    long_sum = (
        "model m {\n  dim H = 2\n  input x[H] : sequence\n  s = "
        + " + ".join(["x"] * 5000)
        + "\n}\n"
    )
    run_check(tmp_path, long_sum)
