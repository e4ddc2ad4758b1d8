"""Attention: a step of one sequence reads every step s of another (x[s], reduced over=s).

Checked three ways: compiled = reverse mode over the unrolled DAG with source and target of
different lengths (each sequence its own lengths), = central differences, and the additive
spec against the same model written by hand in PyTorch (float64, autograd) — an oracle that
shares no code with rnnc. Then the errors: a read on another sequence's clock without x[s]
is refused, never merged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import finite_diff, grad_scale, reference, rel, small_dims
from hypothesis import given, settings
from strategies import attention_models

from rnnc import kernels
from rnnc.compiler import compile_spec, front
from rnnc.errors import RnncError
from rnnc.gradcheck import random_batch, random_lengths
from rnnc.schedule import Loop, Once

ROOT = os.path.join(os.path.dirname(__file__), "..")
SPECS = ["attention_additive", "attention_dot", "self_attention"]
DIMS = {"S": 4, "V": 5, "H": 4, "A": 3}


def spec_path(name: str) -> str:
    return os.path.join(ROOT, "specs", f"{name}.rnn")


def data(m, Ts: dict[str, int], B: int, seed: int, lengths: bool):
    """Random params, inputs and targets, each sequence with its own number of steps; with
    lengths, one sequence of each full and one of a single step."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=v.shape) * 0.5 for k, v in m.init_params(0, np.float64).items()}
    inputs, targets, _ = random_batch(m, Ts, B, seed)
    L = random_lengths(m, Ts, B, rng, shortest=1) if lengths else None
    if L is not None:
        for v in L.values():
            v[-1] = 1
    return params, inputs, targets, L


def steps_of(m, src: int, tgt: int) -> dict[str, int]:
    doms = list(m.graph.graph["domains"])
    return {d: (src if i == 0 else tgt) for i, d in enumerate(doms)}


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("lengths", [False, True])
def test_compiled_equals_the_unrolled_reference_with_lengths_of_their_own(name, lengths):
    m = compile_spec(spec_path(name), dims=small_dims(spec_path(name)))
    Ts = steps_of(m, 6, 3)
    params, inputs, targets, L = data(m, Ts, 3, 1, lengths)
    ref_loss, ref_grads, ref_out = reference(m.graph, Ts, params, inputs, targets, L)
    loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for k, g in ref_grads.items():
        assert rel(grads[k], g) < 1e-12, k
    out = m.loss(params, inputs, targets, lengths=L)
    for k, want in ref_out.items():
        got = out[k]
        if L is not None:  # the compiled outputs are 0 past each length, along t and along s
            got, want = np.asarray(got), kernels.zero_padding(want, *masks_for(m, k, L, Ts))
        assert rel(got, want) < 1e-12, k


def masks_for(m, name: str, L, Ts):
    d = m.graph.nodes[m.graph.graph["outputs"][name]]
    mask = {dom: np.arange(Ts[dom])[:, None] < L[dom][None, :] for dom in Ts}
    if d["level"] in Ts:
        return (mask[d["level"]],) + ((mask[d["pair"]],) if d["pair"] else ())
    return (mask[d["pair"]],) if d["pair"] else (None,)


@pytest.mark.parametrize("name", SPECS)
def test_gradients_equal_central_differences_with_lengths(name):
    m = compile_spec(spec_path(name), dims=small_dims(spec_path(name)))
    Ts = steps_of(m, 5, 3)
    params, inputs, targets, L = data(m, Ts, 2, 3, True)
    _, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    rng = np.random.default_rng(0)
    for k in [*params, *(k for k in inputs if k in grads)]:
        size = (params[k] if k in params else inputs[k]).size
        entries = sorted(rng.choice(size, min(size, 8), replace=False))
        num, idx = finite_diff(m, params, inputs, targets, k, L=L, entries=entries)
        ana = np.asarray(grads[k]).reshape(-1)[idx]
        assert np.abs(num - ana).max() <= 1e-7 * max(1.0, np.abs(ana).max()), k


def test_the_encoder_gets_gradient_at_every_step_through_the_weights():
    """Reaching every encoder step: with no final state passed, the encoder's input gradient
    at each valid step comes only through the attention weights and the context."""
    m = compile_spec(spec_path("attention_additive"), dims=DIMS)
    Ts = steps_of(m, 6, 3)
    params, inputs, targets, L = data(m, Ts, 3, 5, True)
    _, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    dsrc = np.abs(grads["src"]).sum(axis=-1)  # [S, B]
    valid = np.arange(6)[:, None] < L["src"][None, :]
    assert (dsrc[valid] > 0).all() and (dsrc[~valid] == 0).all()


# ----- the PyTorch oracle: Bahdanau attention written by hand -----


def torch_additive(params, inputs, targets, L):
    torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install '.[test]')")
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    src, tgt = (torch.tensor(inputs[k]) for k in ("src", "tgt_in"))
    S, B, _ = src.shape
    T = tgt.shape[0]
    H = P["Ud"].shape[0]
    gru = torch.nn.GRU(src.shape[-1], H, dtype=torch.float64)
    e, _ = torch.func.functional_call(gru, {f"{k}_l0": P[f"e.{k}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}, (src,))
    src_ok = torch.tensor(np.arange(S)[:, None] < L["src"][None, :])
    tgt_ok = torch.tensor(np.arange(T)[:, None] < L["tgt_in"][None, :], dtype=torch.float64)
    keys = e @ P["Wa"].T  # [S, B, A]
    d = torch.zeros(B, H, dtype=torch.float64)
    total = 0.0
    for t in range(T):
        score = (P["va"] * torch.tanh(keys + d @ P["Ua"].T)).sum(-1)  # [S, B]
        a = torch.softmax(score.masked_fill(~src_ok, -torch.inf), dim=0)
        ctx = (a[..., None] * e).sum(0)
        d = torch.tanh(torch.cat([tgt[t], ctx], -1) @ P["Wd"].T + d @ P["Ud"].T + P["bd"])
        logp = torch.log_softmax(torch.cat([d, ctx], -1) @ P["Wy"].T + P["by"], -1)
        nll = -logp.gather(-1, torch.tensor(targets["tgt_out"][t])[:, None])[:, 0]
        total = total + (nll * tgt_ok[t]).sum() / B
    total.backward()
    return float(total.detach()), {k: v.grad.numpy() for k, v in P.items()}


def test_additive_attention_equals_pytorch_by_hand():
    m = compile_spec(spec_path("attention_additive"), dims=DIMS)
    Ts = steps_of(m, 7, 4)
    params, inputs, targets, L = data(m, Ts, 3, 2, True)
    want_loss, want = torch_additive(params, inputs, targets, L)
    loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L)
    assert abs(loss - want_loss) <= 1e-12 * abs(want_loss)
    for k, g in want.items():
        assert rel(grads[k], g) < 1e-10, k


# ----- scheduled like a compiler would -----


def test_the_encoder_projection_is_one_gemm_before_the_decoder_loop():
    m = compile_spec(spec_path("attention_additive"), dims=DIMS, target="numpy")  # its text is read
    g = m.plans["forward"].graph
    steps = m.plans["forward"].steps
    keys = next(i for i, s in enumerate(steps) if isinstance(s, Once) and g.nodes[s.node]["name"] == "keys")
    dec = next(i for i, s in enumerate(steps) if isinstance(s, Loop) and s.dom == "tgt_in")
    assert keys < dec and g.nodes[steps[keys].node]["op"] == "matmul"
    body = m.source[m.source.index("def forward") : m.source.index("def loss(")]
    loop = body[body.index("for t in range(T_tgt_in)") :]
    assert "for s in" not in m.source and "Wa" not in loop  # no loop over s, no Wa @ e per step
    assert "softmax_s(" in loop and "sum_s(" in loop


def test_explain_shows_the_hoisted_gemm_and_the_batched_reads(capsys):
    from rnnc.cli import main

    assert main(["compile", spec_path("attention_additive"), "--explain", "--batch", "4", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "once, before the loop over tgt_in: keys = Wa · e_h_s: one GEMM [20x48]·[48x32] over every step s of src" in out
    assert "read every step s of src at once ([S=5, B] rows, batched; no loop over s)" in out


def test_check_says_which_recurrence_attends_over_what(capsys):
    from rnnc.cli import main

    assert main(["check", spec_path("attention_dot")]) == 0
    out = capsys.readouterr().out
    assert "recurrence (forward over tgt_in, reads t-1, attends over every step of src): d.x," in out
    assert "recurrence (forward over src, reads t-1): e." in out


def test_masked_steps_cost_nothing_numerically():
    x = np.array([[1.0, np.inf], [2.0, -np.inf], [np.nan, 3.0]])[:, :, None]  # [S=3, B=2, 1]
    M = np.array([[True, False], [True, False], [False, False]])  # the second sequence: no step
    with np.errstate(all="raise"):
        y = kernels.softmax_s(np.where(M[..., None], x, 0.0), M, 1)
    assert np.isfinite(y).all() and (y[:, 1] == 0).all() and (y[2] == 0).all()
    assert abs(y[:2, 0].sum() - 1) < 1e-15
    causal = kernels.softmax_s(np.zeros((3, 3, 1)), None, 0, "all")  # [T, S, B]: s <= t
    assert np.allclose(causal[:, :, 0], [[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])


# ----- the language: what it says when a read mixes two clocks -----

TWO = """use GRU

model m {
  dim I = 3, H = 4
  input src[I] : sequence
  input tgt[H] : sequence
  target y : sequence of class(H)
  param W[H, H]
  e = GRU(src, H=H)
%s
  loss = cross_entropy(softmax(d), y)
}
"""


def error_of(body: str, text: str = TWO) -> RnncError:
    with pytest.raises(RnncError) as e:
        front(text % body, "m.rnn")
    return e.value


def test_reading_another_sequences_steps_without_s_is_refused_with_the_attention_form():
    e = error_of("  d = tanh(W @ e + W @ d[t-1] + tgt)")
    assert e.code == "E412" and (e.span.line, e.span.col) == (10, 12)
    assert e.message == "combines 'W @ e + W @ d[t-1]' (steps of 'src') with 'tgt' (steps of 'tgt'): the two inputs' lengths can differ"
    assert "write e[s] and reduce over s: a = softmax(score, over=s), ctx = sum(a * e[s], over=s)" in e.hint
    assert "input tgt ... : sequence like src" in e.hint


def test_two_inputs_declared_on_one_clock_combine():
    text = TWO.replace("input tgt[H] : sequence", "input tgt[H] : sequence like src")
    _, g = front(text % "  d = tanh(W @ e + W @ d[t-1] + tgt)", "m.rnn")
    assert set(g.graph["domains"]) == {"src"}
    e = error_of("  d = tanh(W @ d[t-1] + tgt)", TWO.replace("input tgt[H] : sequence", "input tgt[H] : sequence like W"))
    assert e.code == "E205" and "not an input sequence" in e.message


@pytest.mark.parametrize(
    "body, words",
    [
        ("  d = softmax(W @ d[t-1] + tgt, over=s)", "reads no x[s]"),
        ("  a = softmax(sum(e[s] * e[s]), over=s)\n  d = tanh(W @ a[t-1] + tgt)", "cannot be read at another step t"),
        ("  d = tanh(W @ d[t-1] + tgt + e[s])", "of a value per step s of 'src'"),
        ("  d = tanh(W @ d[t-1] + tgt)\n  k = y[s]", "class labels"),
        ("  d = tanh(W @ d[t-1] + W @ sum(d[s], over=s) + tgt)", "reads every step of 'd' (d[s]) in the recurrence that computes 'd'"),
        ("  d = tanh(W @ d[t-1] + tgt)\n  k = W[s]", "'W' has one value for the whole model"),
        ("  d = tanh(W @ d[t-1] + tgt)\n  k = sum(loss[s], over=s)", "'loss' has one value for the whole model"),
        ("  d = tanh(W @ d[t-1] + tgt + sum(e[s] * tgt[s], over=s))", "two different sequences"),
        ("  d = tanh(W @ d[t-1] + tgt + sum(e[s], over=t))", "over=s"),
        ("  d = tanh(W @ d[t-1] + tgt + mean(e[s], over=s))", "only softmax and sum"),
        ("  d = tanh(W @ d[t-1] + tgt + e[s][s])", "only a named sequence"),
    ],
)
def test_what_attention_cannot_do_is_a_located_error(body, words):
    e = error_of(body)
    assert e.span.line >= 10 and words in e.message + (e.hint or ""), (e.code, e.message, e.hint)


def test_causal_attention_masks_the_future_and_formats_back():
    from rnnc.format import format_program
    from rnnc.parse import parse

    text = Path(spec_path("self_attention")).read_text()
    assert "a = softmax(sum(q * k[s]) / sqrt(H), over=s)" in format_program(parse(text))
    m = compile_spec(spec_path("self_attention"), dims={"V": 5, "H": 4})
    Ts = steps_of(m, 5, 5)
    params, inputs, _, _ = data(m, Ts, 2, 0, False)
    a = m.forward(params, inputs)["a"]  # [T, S, B]
    assert np.allclose(np.triu(np.moveaxis(a, 2, 0), 1), 0) and np.allclose(a.sum(axis=1), 1)


# ----- pictures -----


def unrolled_picture(name: str, T: int = 3) -> str:
    from rnnc.picture import unrolled_dot
    from rnnc.unroll import unroll

    _, g = front(Path(spec_path(name)).read_text(), spec_path(name))
    return unrolled_dot(unroll(g, {d: T for d in g.graph["domains"]}))


def test_each_sequence_has_columns_of_its_own_and_the_final_state_links_them():
    import re

    dot = unrolled_picture("encoder_decoder")
    heads = re.findall(r'(step\d+_\d+) \[label="(\w+): t = (\d)"', dot)
    assert [(d, t) for _, d, t in heads] == [("src", "0"), ("src", "1"), ("src", "2"),
                                             ("tgt_in", "0"), ("tgt_in", "1"), ("tgt_in", "2")]  # fmt: skip
    labels = dict(re.findall(r'  (n\d+) \[label="([^"]*)"', dot))
    links = re.findall(r'  (n\d+) -> (n\d+) \[color="#2e6fb7"[^]]*label="init"', dot)
    assert sorted(labels[u] for u, _ in links) == ["e.c", "e.h"] and sorted(labels[v] for _, v in links) == ["d.c", "d.z"]  # z = concat(h[t-1], x)
    # drawn from the encoder's last step only, not as if the decoder read every encoder step
    from rnnc.picture import column, variables_view
    from rnnc.unroll import unroll

    _, g = front(Path(spec_path("encoder_decoder")).read_text(), "x.rnn")
    dag = unroll(g, {"src": 3, "tgt_in": 3})
    view = variables_view(dag)
    into_decoder = {column(dag, u) for u, v in view.edges if column(dag, v) == ("tgt_in", 0)}
    assert ("src", 2) in into_decoder and not {("src", 0), ("src", 1)} & into_decoder
    from rnnc.picture import to_dot

    _, g = front(Path(spec_path("encoder_decoder")).read_text(), "x.rnn")
    assert to_dot(g).count('label="init"') == 2  # the rolled picture draws the link too


def test_attention_is_one_bundle_per_decoder_step():
    dot = unrolled_picture("attention_additive")
    assert dot.count('[label="e[s]"') == 1  # scores and context read one e[s]
    into_ctx = [line for line in dot.splitlines() if 'penwidth=2.2' in line]
    assert len(into_ctx) == 3 + 1  # each decoder step's context, and the keys (computed once)
    assert dot.count("style=dotted, arrowhead=none") == 3  # each encoder step into the bundle


# ----- the reverse task -----


def test_the_reverse_task_writes_each_string_backwards_and_ends_it():
    from rnnc import tasks

    ins, tgs, L = tasks.reverse_batch(np.random.default_rng(0), 6, 16)
    src, tgt_in, tgt_out = ins["src"], ins["tgt_in"], tgs["tgt_out"]
    assert src.shape == (6, 16, 12) and tgt_in.shape == (7, 16, 12) and tgt_out.shape == (7, 16)
    assert (L["tgt_in"] == L["src"] + 1).all() and L["src"].min() >= 1 and L["src"].max() <= 6
    assert len(set(L["src"].tolist())) > 3
    for b in range(16):
        n = L["src"][b]
        digits = src[:n, b].argmax(-1)
        assert (src[n:, b] == 0).all() and (src[:n, b].sum(-1) == 1).all() and digits.max() < 10
        assert tgt_out[: n + 1, b].tolist() == [*digits[::-1].tolist(), tasks.END]
        assert tgt_in[: n + 1, b].argmax(-1).tolist() == [tasks.START, *digits[::-1].tolist()]
        assert (tgt_in[n + 1 :, b] == 0).all()


def test_rnnc_run_trains_attention_on_the_reverse_task(capsys):
    from rnnc.cli import main

    code = main(["run", spec_path("attention_dot"), "--train", "--task", "reverse", "--steps", "40",
                 "--dim", "H=16", "--seq-len", "4", "--lr", "0.01"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "trained attention_dot on reverse: 40 steps" in out.out


@pytest.mark.parametrize("name", ["attention_additive", "attention_dot", "self_attention", "encoder_decoder"])
def test_the_memory_estimate_counts_every_step_s(name):
    """A value per step s is [T, S, B, ...]: the estimate grows with T * S and stays near what
    the training step really allocates (NumPy's arrays, traced). Kernels' temporaries over
    whole [T, S, B, ...] arrays (self-attention's softmax over s) are not counted: up to 1.6x."""
    import tracemalloc

    from rnnc.memory import estimate

    m = compile_spec(spec_path(name))
    Ts = steps_of(m, 40, 40)
    params, inputs, targets, _ = data(m, Ts, 16, 0, False)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    m.loss_and_grads(params, inputs, targets)
    tracemalloc.start()
    try:
        m.loss_and_grads(params, inputs, targets)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0.8 <= peak / estimate(m, 40, 16, np.float32).activations <= 1.6


@settings(max_examples=30)
@given(attention_models())
def test_random_attention_models_compiled_equals_reference_and_central_differences(case):
    """The trust issue's generator with attention: random encoder-decoders (additive, dot and
    general scores, input feeding or not, projected values, causal self-attention), source and
    target of different lengths, each with lengths of its own."""
    text, opt = case
    m = compile_spec(text)
    params, inputs, targets, L = data(m, opt["Ts"], opt["B"], opt["seed"], opt["lengths"])
    ref_loss, ref_grads, _ = reference(m.graph, opt["Ts"], params, inputs, targets, L)
    loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    assert abs(loss - ref_loss) <= 1e-10 * max(abs(ref_loss), 1e-300)
    floor = 1e-6 * grad_scale(ref_grads)
    for k, g in ref_grads.items():
        assert rel(grads[k], g, floor) < 1e-10, k
    rng = np.random.default_rng(opt["seed"])
    for k in params:
        entries = sorted(rng.choice(params[k].size, min(params[k].size, 3), replace=False))
        num, idx = finite_diff(m, params, inputs, targets, k, L=L, entries=entries)
        ana = np.asarray(grads[k]).reshape(-1)[idx]
        scale = max(np.linalg.norm(num), np.linalg.norm(ana), 1e-3 * abs(loss))
        assert np.linalg.norm(ana - num) / scale < 1e-6, k


def test_the_natural_wrong_spec_is_refused_not_run_on_the_decoders_clock(tmp_path, capsys):
    """A decoder that reads the encoder's e plainly (the issue's report: rnnc check used to
    call the encoder a recurrence over the decoder's input) is a located error, exit 1."""
    from rnnc.cli import main

    spec = tmp_path / "wrong.rnn"
    spec.write_text("use GRU\n\nmodel wrong {\n  dim S = 5, V = 4, H = 3\n  input src[S] : sequence\n"
                    "  input tgt_in[V] : sequence\n  target tgt_out : sequence of class(V)\n"
                    "  param Wd[H, V + H], Ud[H, H], Wy[V, H]\n  e = GRU(src, H=H)\n"
                    "  d = tanh(Wd @ concat(tgt_in, e) + Ud @ d[t-1])\n"
                    "  loss = cross_entropy(softmax(Wy @ d), tgt_out)\n}\n")  # fmt: skip
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "wrong.rnn:10:17: error[E412]: combines 'tgt_in' (steps of 'tgt_in') with 'e' (steps of 'src')" in err
    assert "write e[s] and reduce over s" in err


def test_sums_over_decoder_steps_run_inside_the_backward_loop():
    """What each decoder step sends back to e[s] is added up as the loop runs: two running
    [S, B, H] values, not [T, S, B, H] arrays of the terms kept for a sum after the loop."""
    m = compile_spec(spec_path("attention_dot"), dims={"H": 8}, target="numpy")  # its text is read
    plan = m.plans["loss_and_grads"]
    assert len(plan.accumulate) == 2 and not plan.accumulate & plan.stored
    src = m.source[m.source.index("def loss_and_grads(") :]
    back = src[src.index("for t in range(T_tgt_in - 1, -1, -1):") :].split("\n    del", 1)[0]
    assert sum(" += " in line for line in back.splitlines()) == 2, back
    assert "dctx[t] = " not in src and "da_sum_f[t] = " not in src


def test_gradcheck_draws_each_clock_its_own_length():
    """rnnc gradcheck on a model with two clocks: the second sequence is a step shorter, so a
    mix-up of the two lengths cannot hide; the check passes."""
    import rnnc.gradcheck as gc

    m = compile_spec(spec_path("attention_dot"), dims=small_dims(spec_path("attention_dot")))
    seen = []
    batch = gc.random_batch
    gc.random_batch = lambda m, T, *a, **k: seen.append(T) or batch(m, T, *a, **k)
    try:
        rows = gc.gradcheck(m, T=5)
    finally:
        gc.random_batch = batch
    assert seen == [{"src": 5, "tgt_in": 4}]
    assert all(r.error < gc.TOL for r in rows), [(r.name, r.error) for r in rows]
