"""Golden graphs: the ops, shapes and delays of a few specs (pretty printer output).
Run with RNNC_UPDATE_GOLDEN=1 to rewrite them after an intended change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rnnc.compiler import front, read_spec
from rnnc.graph import pretty

HERE = os.path.dirname(__file__)
GOLDEN = ["elman", "lstm", "captioning", "pyramidal", "encoder_decoder"]


@pytest.mark.parametrize("name", GOLDEN)
def test_graph_matches_golden(name):
    text, _ = read_spec(os.path.join(HERE, "..", "specs", name + ".rnn"))
    _, g = front(text, f"{name}.rnn")
    got = pretty(g) + "\n"
    path = os.path.join(HERE, "golden", f"{name}.graph")
    if os.environ.get("RNNC_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(got)
    assert os.path.exists(path), f"no golden file {path}: run with RNNC_UPDATE_GOLDEN=1 once"
    assert got == Path(path).read_text()
