"""The gradient checker a user trusts: it passes every shipped spec at its defaults, and it
fails on a planted gradient error of relative size 1e-6, on NaN, and on misuse."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from rnnc.cli import main
from rnnc.compiler import Model, compile_spec
from rnnc.gradcheck import ALL, gradcheck

SPECS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "specs", "*.rnn")))


@pytest.mark.parametrize("path", SPECS, ids=[os.path.basename(p) for p in SPECS])
def test_every_shipped_spec_passes_at_the_defaults(path):
    m = compile_spec(path)
    for T in (3, 5, 7, 11):
        for seed in range(5):
            rows = gradcheck(m, T=T, seed=seed)
            worst = max(rows, key=lambda r: r.error)
            assert worst.error <= 1e-7, (T, seed, worst)


class Planted(Model):
    """A model whose gradient for `name` is off by `size` relative (norm-wise)."""

    def __init__(self, m: Model, name: str | None, size: float):
        super().__init__(**{f: getattr(m, f) for f in m.__dataclass_fields__})
        self.name, self.size, self.rng = name, size, np.random.default_rng(7)

    def loss_and_grads(self, params, inputs, targets, **kw):
        loss, grads = super().loss_and_grads(params, inputs, targets, **kw)
        for k in [self.name] if self.name else list(grads):
            r = self.rng.normal(size=np.shape(grads[k]))
            grads[k] = grads[k] + self.size * np.linalg.norm(grads[k]) * r / np.linalg.norm(r)
        return loss, grads


@pytest.mark.parametrize("spec", ["elman", "lstm", "gru", "elman_relu", "encoder_decoder"])
def test_a_planted_error_of_1e_6_fails(spec):
    m = compile_spec(os.path.join(os.path.dirname(__file__), "..", "specs", spec + ".rnn"))
    for name in [next(iter(m.params)), list(m.params)[-1]]:
        for seed in range(3):
            rows = {r.name: r for r in gradcheck(Planted(m, name, 1e-6), seed=seed)}
            assert rows[name].error > 1e-7, (name, seed, rows[name])
            assert all(r.error <= 1e-7 for k, r in rows.items() if k not in (name, ALL))
    rows = {r.name: r for r in gradcheck(Planted(m, None, 1e-6))}
    assert rows[ALL].error > 1e-7


LOG = """model m {
  dim I = 3, H = 4
  input x[I] : sequence
  target y[H] : sequence
  param W[H, I]
  h = log(W @ x)
  loss = mse(h, y)
}"""


def test_nan_fails_with_its_reason(tmp_path, capsys):
    path = tmp_path / "log.rnn"
    path.write_text(LOG)
    assert main(["gradcheck", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: the loss itself is nan" in out and "FAILED" in out and " ok\n" not in out


@pytest.mark.parametrize(
    "args", [["--eps", "0"], ["--eps", "nan"], ["--eps", "-1"], ["--steps", "0"],
             ["--samples", "0"], ["--directions", "-2"], ["--batch", "0"], ["--tol", "inf"]],
)  # fmt: skip
def test_numbers_that_check_nothing_are_misuse(args, capsys):
    assert main(["gradcheck", os.path.join(os.path.dirname(SPECS[0]), "elman.rnn"), *args]) == 2
    assert "must be" in capsys.readouterr().err


def test_cli_passes_a_shipped_spec(capsys):
    assert main(["gradcheck", os.path.join(os.path.dirname(SPECS[0]), "pyramidal.rnn"),
                 "--steps", "7"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.rstrip().endswith("ok") and "FAIL" not in out
