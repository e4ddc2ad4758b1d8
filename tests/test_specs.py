"""Every spec in specs/: parses, formats idempotently, checks, unrolls and interprets; compiles;
compiled forward, loss and gradients equal the unrolled reference; gradients equal central
differences in float64."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import finite_diff, random_data, reference, rel, small_dims

from rnnc.compiler import compile_spec, front, read_spec
from rnnc.format import format_program
from rnnc.interpret import interpret, outputs
from rnnc.parse import parse
from rnnc.unroll import unroll


def test_there_are_at_least_14_specs(spec):
    import glob
    import os

    assert len(glob.glob(os.path.join(os.path.dirname(spec), "*.rnn"))) >= 14


def test_spec_starts_with_a_comment_saying_what_it_is(spec):
    with open(spec) as f:
        assert f.readline().startswith("# ")


def test_parses_and_formats_idempotently(spec):
    text, file = read_spec(spec)
    program = parse(text, file)
    out = format_program(program)
    assert parse(out) == program
    assert format_program(parse(out, file)) == out
    assert out == text, "specs/ are kept in canonical format (rnnc fmt --write)"


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5])
def test_unrolls_and_interprets_finite(spec, T):
    text, file = read_spec(spec)
    _, g = front(text, file, small_dims(spec))
    Ts, params, inputs, targets, _ = random_data(g, max(T, 2) if "pairs" in text else T, 2)
    dag = unroll(g, Ts)
    vals = interpret(dag, params, inputs, targets)
    out = outputs(dag, vals)
    assert out and all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("lengths", [False, True])
def test_compiled_equals_unrolled_reference(spec, lengths):
    dims = small_dims(spec)
    m = compile_spec(spec, dims=dims)
    Ts, params, inputs, targets, L = random_data(m.graph, 6, 3, seed=1, lengths=lengths)
    ref_loss, ref_grads, ref_out = reference(m.graph, Ts, params, inputs, targets, L)
    loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert set(grads) >= set(ref_grads)
    for name, g in ref_grads.items():
        assert rel(grads[name], g) < 1e-12, name
    out = m.forward(params, inputs, lengths=L)
    for name, v in out.items():
        if L is None or np.ndim(v) < 3:
            assert rel(v, ref_out[name]) < 1e-12, name


def test_vjp_pauses_for_the_targets_and_equals_the_reference(spec):
    """compile_spec(vjp=True): the generator yields the forward outputs, is sent the targets
    and returns loss_and_grads(with_inputs=True)'s answer, against the unrolled reference."""
    dims = small_dims(spec)
    m = compile_spec(spec, dims=dims, vjp=True)
    if m.grad_graph is None:
        assert not hasattr(m.module, "vjp")
        return
    Ts, params, inputs, targets, L = random_data(m.graph, 6, 3, seed=4, lengths=True)
    ref_loss, ref_grads, ref_out = reference(m.graph, Ts, params, inputs, targets, L)
    tape = m.vjp(params, inputs, lengths=L)
    out = next(tape)
    assert set(out) == set(m.forward(params, inputs, lengths=L))
    for name, v in out.items():
        if np.ndim(v) < 3:  # the reference's sequences are not zero past each length
            assert rel(v, ref_out[name]) < 1e-12, name
    with pytest.raises(StopIteration) as done:
        tape.send(targets)
    loss, grads = done.value.value
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for name, g in ref_grads.items():
        assert rel(grads[name], g) < 1e-12, name


def test_gradients_equal_central_differences(spec):
    m = compile_spec(spec, dims=small_dims(spec))
    _Ts, params, inputs, targets, _ = random_data(m.graph, 5, 2, seed=2)
    _, grads = m.loss_and_grads(params, inputs, targets, with_inputs=True)
    rng = np.random.default_rng(0)
    for name in [*params, *(k for k in inputs if k in grads)]:
        size = (params.get(name) if name in params else inputs[name]).size
        entries = sorted(rng.choice(size, min(size, 12), replace=False))
        num, idx = finite_diff(m, params, inputs, targets, name, entries=entries)
        ana = np.asarray(grads[name]).reshape(-1)[idx]
        err = np.linalg.norm(ana - num) / max(np.linalg.norm(num), 1e-12)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


def test_float32_by_default_float64_on_request(spec):
    m = compile_spec(spec, dims=small_dims(spec))
    p32 = m.init_params(0)
    assert all(v.dtype == np.float32 for v in p32.values())
    p64 = m.init_params(0, np.float64)
    _Ts, _, inputs, targets, _ = random_data(m.graph, 4, 2)
    _loss, grads = m.loss_and_grads(p64, inputs, targets)
    assert all(np.asarray(g).dtype == np.float64 for g in grads.values())
    loss32, grads32 = m.loss_and_grads(p32, {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v
                                             for k, v in inputs.items()}, targets)  # fmt: skip
    assert all(np.asarray(grads32[k]).dtype == np.float32 for k in p32)
    assert np.isfinite(loss32)


def test_small_dims_cover_the_specs(spec):
    # every dim of every spec is small in the tests that use small_dims (else they run at the
    # spec's full size, and central differences over whole tensors get slow)
    small = small_dims(spec)
    from rnnc.compiler import front, read_spec

    text, file = read_spec(spec)
    _, g = front(text, file, small)
    assert all(v <= 8 for k, v in g.graph["env"].items() if "." not in k), g.graph["env"]
