"""Hypothesis: random recurrent cells (random expression DAGs over the op registry, delays
±1..3, directions, stacking, lengths). Compiled forward == the interpreter over unroll(g, T);
compiled gradients == reverse mode over the unrolled DAG == central differences (float64)."""

from __future__ import annotations

import numpy as np
from helpers import finite_diff, grad_scale, random_data, reference, rel
from hypothesis import example, given, settings
from strategies import cells, models

from rnnc.compiler import compile_spec
from rnnc.format import format_program
from rnnc.gradcheck import gradcheck
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
        # per entry; the floor keeps the tolerance 10x above it (a normalized cell whose
        # gradients are ~1e-5 once sat exactly at 1x)
        scale = max(np.linalg.norm(num), np.linalg.norm(ana), 1e-3 * abs(loss))
        assert np.linalg.norm(ana - num) / scale < 1e-6, name


@settings(max_examples=60)
@given(models())
@example(  # a gate fusion once dropped e1's initial value (carries and h0 were ignored)
    case=('cell C(x[I]) -> e2[H] {\n  param U[H, I], b[H], P[3*H, I], W3[H, H], A4[H, I]\n  e0 = tanh(U @ x)\n  e1 = identity(U @ x)\n  e2 = tanh(U @ x + tanh(A4 @ x + W3 @ e1[t-1]) + e2[t-1])\n}\nmodel m {\n  dim H = 1, I = 1, K = 2, F = 2\n  input x[I] : sequence\n  target y[K] : sequence\n  param Wy[K, H], by[K]\n  h = C(x, H=H)\n  loss = mse(Wy @ h + by, y)\n}\n',
          {'T': 3, 'B': 1, 'lengths': False, 'seed': 0, 'windows': True}),
)
@example(
    case=('cell C(x[I]) -> e2[H] {\n  param U[H, I], b[H], P[3*H, I], W3[H, H]\n  e0 = tanh(U @ x)\n  e1 = tanh(U @ x)\n  e2 = tanh(U @ x * W3 @ e2[t-1] + e2[t-1])\n}\nmodel m {\n  dim H = 2, I = 1, K = 2, F = 2\n  input x[I] : sequence\n  target y[K] : sequence\n  param Wy[K, H], by[K], h0[H]\n  h = C(x, H=H, init=h0)\n  loss = mse(Wy @ h + by, y)\n}\n',
     {'T': 2, 'B': 1, 'lengths': True, 'seed': 0, 'windows': True}),
)
@example(
    case=('cell C(x[I]) -> e2[H] {\n  param U[H, I], b[H], P[3*H, I], W3[H, H]\n  e0 = tanh(U @ x)\n  e1 = tanh(U @ x)\n  e2 = tanh(U @ x * W3 @ e2[t-1] + e2[t-1])\n}\nmodel m {\n  dim H = 2, I = 1, K = 2, F = 2\n  input x[I] : sequence\n  target y[K] : sequence\n  param Wy[K, H], by[K], h0[H]\n  h = C(x, H=H, init=h0)\n  loss = mse(Wy @ h + by, y)\n}\n',
     {'T': 2, 'B': 1, 'lengths': False, 'seed': 0, 'windows': True}),
)
@example(
    case=('cell C(x[I]) -> e1[H] {\n  param U[H, I], b[H], P[3*H, I]\n  e0 = tanh(U @ x[t-1])\n  e1 = tanh(tanh(U @ x) + e1[t-1])\n}\nmodel m {\n  dim H = 1, I = 1, K = 2, F = 2\n  input x[I] : sequence\n  target y[K] : sequence\n  param Wy[K, H], by[K]\n  h = C(x, H=H)\n  loss = mse(Wy @ h + by, y)\n}\n',
     {'T': 2, 'B': 1, 'lengths': False, 'seed': 0, 'windows': True}),
)
@example(
    case=('cell C(x[I]) -> e0[H] {\n  param U[H, I], b[H], P[3*H, I]\n  e0 = tanh(leaky_relu(U @ x) + e0[t-1])\n}\nmodel m {\n  dim H = 1, I = 1, K = 2, F = 2\n  input x[I] : sequence\n  target y : class(K)\n  param Wy[K, H], by[K], Ug[H, I], Wg[H, H], Vg[K, H]\n  h = bidirectional(sum) C(x, H=H)\n  g = tanh(Ug @ x + Wg @ g[t+1])\n  loss = cross_entropy(softmax(Wy @ last(h) + Vg @ first(g) + by), y)\n}\n',
     {'T': 2, 'B': 1, 'lengths': False, 'seed': 2, 'windows': False}),
)
def test_random_models_three_ways_and_across_windows(case):
    """The models that once broke (nested projections, packed slices, two directions, delayed
    inputs, h0 params, first/last, lengths): compiled = unrolled reference = central
    differences; a forward-only model run in two windows with the carry = the whole."""
    text, opt = case
    m = compile_spec(text)
    assert parse(format_program(parse(text))) == parse(text)
    Ts, params, inputs, targets, L = random_data(m.graph, opt["T"], opt["B"], opt["seed"],
                                                 opt["lengths"])  # fmt: skip
    ref_loss, ref_grads, ref_out = reference(m.graph, Ts, params, inputs, targets, L)
    loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    assert abs(loss - ref_loss) <= 1e-10 * max(abs(ref_loss), 1e-300)
    floor = 1e-8 * grad_scale(ref_grads)
    for name, g in ref_grads.items():
        assert np.shape(grads[name]) == np.shape(g), name
        assert rel(grads[name], g, floor) < 1e-9, name
    out = m.forward(params, inputs, lengths=L)
    for name, v in out.items():
        if name in ref_out and np.ndim(v) == 3 and L is not None:
            M = (np.arange(v.shape[0])[:, None] < L[m.graph.nodes[m.graph.graph["outputs"][name]]["level"]])
            assert rel(v, ref_out[name] * M[..., None]) < 1e-10, name  # padding is zero
        elif name in ref_out:
            assert rel(v, ref_out[name]) < 1e-10, name
    # central differences along random directions (the checker users run)
    rows = gradcheck(m, T=opt["T"], batch=max(opt["B"], 2), seed=opt["seed"] % 1000, directions=4)
    assert max(r.error for r in rows) < 1e-6, [r for r in rows if r.error >= 1e-6]
    if opt["windows"] and L is None and Ts["x"] >= 2:
        cut = Ts["x"] // 2
        first = {k: (v[:cut] if v.ndim == 3 else v) for k, v in inputs.items()}
        rest = {k: (v[cut:] if v.ndim == 3 else v) for k, v in inputs.items()}
        a, carry = m.forward(params, first, return_carry=True)
        b = m.forward(params, rest, carry=carry)
        whole = m.forward(params, inputs)
        for name, v in whole.items():
            if np.ndim(v) == 3:
                assert rel(np.concatenate([a[name], b[name]]), v) < 1e-12, name
