"""Every malformed spec in cases/malformed.txt gives its located, worded error; through the CLI
it prints `file:line:col: error[...]`, the line, carets, and exits 1 — never a traceback."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from rnnc.check import require_loss
from rnnc.cli import main
from rnnc.compiler import front
from rnnc.errors import RnncError

HERE = os.path.dirname(__file__)


def cases() -> list[tuple[str, str, str]]:
    text = Path(HERE, "cases", "malformed.txt").read_text()
    parts = re.split(r"^=== (.*)\n", text, flags=re.M)
    out = []
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        spec, expected = body.split("\n--- ")
        out.append((name, spec + "\n", expected.strip()))
    return out


CASES = cases()


def test_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name,spec,expected", CASES, ids=[c[0] for c in CASES])
def test_error_location_and_message(name, spec, expected):
    with pytest.raises(RnncError) as info:
        _, g = front(spec, "case.rnn")
        if g.graph.get("loss") is not None:
            require_loss(g)
    e = info.value
    assert f"{e.span.line}:{e.span.col}: {e.message}" == expected


@pytest.mark.parametrize("name,spec,expected", CASES[::5], ids=[c[0] for c in CASES[::5]])
def test_cli_renders_error(tmp_path, capsys, name, spec, expected):
    path = tmp_path / "case.rnn"
    path.write_text(spec)
    code = main(["check", str(path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith(f"{path}:{expected.split(':')[0]}:{expected.split(':')[1]}: error[E")
    assert "^" in err  # a caret under the span
