"""Hypothesis: random recurrent cells (random expression DAGs over the op registry, delays
±1..3, directions, stacking, lengths). Compiled forward == the interpreter over unroll(g, T);
compiled gradients == reverse mode over the unrolled DAG == central differences (float64)."""

from __future__ import annotations

import numpy as np
from helpers import finite_diff, grad_scale, random_data, reference, rel
from hypothesis import given, settings
from strategies import cells

from rnnc.compiler import compile_spec
from rnnc.format import format_program
from rnnc.parse import parse


@settings(max_examples=60)
@given(cells())
def test_random_cell_gradients(case):
    program, opt = case
    text = format_program(program)
    assert parse(text) == program
    m = compile_spec(text)
    Ts, params, inputs, targets, L = random_data(
        m.graph, opt["T"], opt["B"], opt["seed"], opt["lengths"]
    )
    ref_loss, ref_grads, ref_out = reference(m.graph, Ts, params, inputs, targets, L)
    loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    assert abs(loss - ref_loss) <= 1e-10 * max(abs(ref_loss), 1e-300)
    floor = 1e-6 * grad_scale(ref_grads)
    for name, g in ref_grads.items():
        assert rel(grads[name], g, floor) < 1e-10, name
    out = m.forward(params, inputs, lengths=L)
    if L is None:
        for name, v in out.items():
            assert rel(v, ref_out[name]) < 1e-10, name
    # central differences on a few entries of every param
    rng = np.random.default_rng(opt["seed"])
    for name in params:
        size = params[name].size
        entries = sorted(rng.choice(size, min(size, 4), replace=False))
        num, idx = finite_diff(m, params, inputs, targets, name, L=L, entries=entries)
        ana = np.asarray(grads[name]).reshape(-1)[idx]
        # central differences carry round-off of about |loss| * 1e-16 / eps = |loss| * 1e-10
        scale = max(np.linalg.norm(num), np.linalg.norm(ana), 1e-4 * abs(loss))
        assert np.linalg.norm(ana - num) / scale < 1e-6, name
