"""Random text and random mutations of the specs: `rnnc check` succeeds or gives a located
error with exit 1 — never an uncaught exception (exit 3)."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnc.cli import main
from rnnc.parse import parse

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


# ----- past check: mutants through every stage -----

LOCATED = re.compile(r"^\S+?(:\d+:\d+)?: error\[E\d+\]: ")
WORDS = ["q", "t", "model", "H", "x1", "h", "x", "s", "W", "tanh", "sigmoid", "last", "first",
         "final", "init", "stack(2)", "bidirectional", "reverse", "concat", "0", "1", "2"]  # fmt: skip


def mutate(text: str, rng: random.Random) -> str:
    """One to four edits: characters, lines, words, delays, dims."""
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["delete", "duplicate", "insert", "swap", "word", "delay", "number"])
        lines = text.splitlines()
        if kind in ("delete", "duplicate", "insert") and text:
            i = rng.randrange(len(text))
            text = text[:i] + (
                "" if kind == "delete" else text[i] if kind == "duplicate"
                else rng.choice(list("()[]{}=+-*/@,:#t1xH\n ")) + text[i]
            ) + text[i + 1 :]  # fmt: skip
        elif kind == "swap" and len(lines) > 2:
            a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines) + "\n"
        elif kind == "word":
            words = sorted({w for w in re.findall(r"[A-Za-z_]\w*", text)})
            if words:
                text = re.sub(rf"\b{re.escape(rng.choice(words))}\b", rng.choice(WORDS), text, count=1)
        elif kind == "delay":
            text = re.sub(r"\[t-1\]", rng.choice(["[t-2]", "[t+1]", "[t]", "[t-3]", "[t-1]"]), text, count=1)
        elif kind == "number":
            nums = list(re.finditer(r"\b\d+\b", text))
            if nums:
                m = rng.choice(nums)
                text = text[: m.start()] + rng.choice(["0", "1", "3", "64", "2*H"]) + text[m.end() :]
    return text


def small(path: str) -> list[str]:
    """--dim options that make a mutant quick to gradcheck (only dims the model has)."""
    from rnnc.compiler import front, read_spec

    text, file = read_spec(path)
    _, g = front(text, file)
    return [f"--dim={k}={v}" for k, v in {"V": 5, "H": 3, "K": 3, "F": 3, "S": 3}.items()
            if k in g.graph["dims"]]  # fmt: skip


def run(argv: list[str]) -> tuple[int, str, str]:
    """One command in-process: (exit code, stdout, stderr); over 10 s fails."""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    took = time.perf_counter() - t0
    assert took < 10, f"rnnc {argv[0]} took {took:.1f} s on:\n{Path(argv[1]).read_text()}"
    return code, out.getvalue(), err.getvalue()


def equals_reference(path: str) -> bool:
    from helpers import grad_scale, random_data, reference, rel

    from rnnc.compiler import compile_spec

    dims = {d.split("=")[1]: int(d.split("=")[2]) for d in small(path)}
    np.seterr(all="ignore")
    m = compile_spec(path, dims=dims)
    Ts, params, inputs, targets, L = random_data(m.graph, 3, 2, 0, True)
    _, ref, _ = reference(m.graph, Ts, params, inputs, targets, L)
    _, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    if not all(np.isfinite(v).all() for v in ref.values()):  # an exploding model: the same
        return all(np.array_equal(np.isfinite(grads[k]), np.isfinite(v)) for k, v in ref.items())
    return all(rel(grads[k], v, 1e-8 * grad_scale(ref)) < 1e-9 for k, v in ref.items())


def through_every_stage(path: str, text: str) -> bool:
    """check -> compile -> gradcheck -> fmt: exit 0 or a located error, within 10 s each.
    True when the mutant reached compile."""
    code, _, err = run(["check", path])
    assert code in (0, 1) and "Traceback" not in err, f"check: exit {code}\n{err}\n{text}"
    if code == 1:
        assert LOCATED.match(err), f"check: exit 1 without a located error:\n{err}\n{text}"
        return False
    code, _, err = run(["compile", path])
    assert code in (0, 1) and (code == 0 or LOCATED.match(err)), f"compile: {code}\n{err}\n{text}"
    if code == 0:
        code, out, err = run(["gradcheck", path, "--steps", "3", "--directions", "2", *small(path)])
        if code == 1 and "FAIL" in out:
            bad = [line for line in out.splitlines() if "FAIL" in line and "FAILED" not in line]
            if not all("not finite" in line or "is nan" in line or "is inf" in line for line in bad):
                # finite differences of an exploding model can miss: the unrolled reference,
                # which shares no scheduling or lowering with the module, settles it
                assert equals_reference(path), f"gradcheck and the reference:\n{out}\n{text}"
        else:
            assert code in (0, 1) and (code == 0 or LOCATED.match(err)), f"gradcheck: {code}\n{err}"
    code, out, err = run(["fmt", path])
    assert code == 0 and parse(out) == parse(text), f"fmt: {code}\n{err}\n{text}"
    return True


def fuzz(tmp_path, count: int, seed: int) -> int:
    rng = random.Random(seed)
    path = tmp_path / "mutant.rnn"
    reached = tries = 0
    while reached < count and tries < 12 * count:
        text = mutate(rng.choice(SPECS), rng)
        path.write_text(text, encoding="utf-8")
        reached += through_every_stage(str(path), text)
        tries += 1
    return reached


def test_500_mutants_through_check_compile_gradcheck_and_fmt(tmp_path):
    assert fuzz(tmp_path, 500, seed=0) >= 500


@pytest.mark.slow
def test_10000_mutants_through_every_stage(tmp_path):
    assert fuzz(tmp_path, 10_000, seed=1) >= 10_000
