"""Exact or refused: each model here once gave a wrong answer or a crash one step off the
textbook path (issue 10). Each is checked against an oracle that shares no code with the
compiled module: a hand-written NumPy loop, central differences, or the unrolled reference."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from helpers import finite_diff, grad_scale, random_data, reference, rel

from rnnc import kernels
from rnnc.compiler import compile_spec
from rnnc.errors import RnncError
from rnnc.parse import parse

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")

HEAD = """model m {
  dim I = 3, H = 4
  input x[I] : sequence
  target y[H] : sequence
  param W[H, H], U[H, I], A[H, I], B[H, I], C[H, H], D[H, H]
  %s
}"""


def three_way(text: str, T: int = 5, B: int = 3, lengths: bool = False, seed: int = 0):
    """Compiled loss and gradients == the unrolled reference == central differences."""
    m = compile_spec(text)
    Ts, params, inputs, targets, L = random_data(m.graph, T, B, seed, lengths)
    ref_loss, ref_grads, _ = reference(m.graph, Ts, params, inputs, targets, L)
    loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    floor = 1e-8 * grad_scale(ref_grads)
    for name, g in ref_grads.items():
        assert np.shape(grads[name]) == np.shape(g), name
        assert rel(grads[name], g, floor) < 1e-10, name
    for name in [*params, *(k for k in inputs if k in grads)]:
        num, idx = finite_diff(m, params, inputs, targets, name, L=L)
        ana = np.asarray(grads[name]).reshape(-1)[idx]
        assert np.linalg.norm(ana - num) / max(np.linalg.norm(num), 1e-8) < 1e-6, name
    return m, params, inputs, targets, L, grads


# ----- 1. an input read at another step keeps its delay -----


def test_input_read_one_step_back_matches_a_hand_loop():
    m, params, inputs, _, _, _ = three_way(HEAD % "s = tanh(U @ x[t-1])\n  loss = mse(s, y)")
    x, U = inputs["x"], params["U"]
    want = np.tanh(np.concatenate([np.zeros_like(x[:1]), x[:-1]]) @ U.T)  # x before t=0 is 0
    assert rel(m.forward(params, inputs)["s"], want) < 1e-14


def test_input_read_at_two_delays_inside_a_recurrence():
    m, params, inputs, _, _, _ = three_way(
        HEAD % "s = tanh(W @ s[t-1] + U @ x[t-1] + A @ x)\n  loss = mse(s, y)", lengths=True
    )
    x, W, U, A = inputs["x"], params["W"], params["U"], params["A"]
    s, prev, xprev = [], np.zeros((x.shape[1], 4)), np.zeros_like(x[0])
    for t in range(x.shape[0]):
        prev = np.tanh(prev @ W.T + xprev @ U.T + x[t] @ A.T)
        xprev = x[t]
        s.append(prev)
    assert rel(m.forward(params, inputs)["s"], np.stack(s)) < 1e-14


def test_input_read_ahead_and_carried_between_windows():
    text = HEAD % "s = tanh(W @ s[t-1] + U @ x[t-2])\n  loss = mse(s, y)"
    m = compile_spec(text)
    _, params, inputs, _, _ = random_data(m.graph, 6, 2, seed=1)
    whole = m.forward(params, inputs)["s"]
    a, carry = m.forward(params, {"x": inputs["x"][:3]}, return_carry=True)
    b = m.forward(params, {"x": inputs["x"][3:]}, carry=carry)
    assert rel(np.concatenate([a["s"], b["s"]]), whole) < 1e-14


# ----- 2. a parameter as the initial state -----

LEARNED_INIT = """cell RNN(x[I]) -> h[H] {
  param W[H, H], U[H, I]
  h = tanh(W @ h[t-1] + U @ x)
}
model m {
  dim I = 3, H = 4
  input x[I] : sequence
  target y[H] : sequence
  param h0[H]
  h = RNN(x, H=H, init=h0)
  loss = mse(h, y)
}"""


def test_parameter_initial_state_gradient_is_summed_over_the_batch():
    m, params, inputs, *_ , grads = three_way(LEARNED_INIT, lengths=True)
    assert grads["h0"].shape == (4,)
    # hand loop: h0 broadcast over the batch
    x, W, U, h = inputs["x"], params["h.W"], params["h.U"], params["h0"]
    hs = []
    for t in range(x.shape[0]):
        h = np.tanh(h @ W.T + x[t] @ U.T)
        hs.append(h)
    assert rel(m.forward(params, inputs)["h"], np.stack(hs)) < 1e-14


def test_parameter_initial_state_trains(tmp_path):
    from rnnc.cli import main

    spec = tmp_path / "adding_h0.rnn"
    spec.write_text(
        "cell R(x[I]) -> h[H] {\n  param W[H, H], U[H, I]\n  h = tanh(W @ h[t-1] + U @ x)\n}\n"
        "model m {\n  dim H = 8\n  input x[2] : sequence\n  target sum[1] : static\n"
        "  param h0[H], Wo[1, H], bo[1]\n  h = R(x, H=H, init=h0)\n"
        "  loss = mse(Wo @ last(h) + bo, sum)\n}\n"
    )
    out = tmp_path / "p.npz"
    code = main(["run", str(spec), "--train", "--task", "adding", "--steps", "3", "--batch", "4",
                 "--seq-len", "6", "-o", str(out), "--float64"])  # fmt: skip
    assert code == 0
    with np.load(out) as p:
        assert p["param/h0"].shape == (8,)


# ----- 3. first(v) of a per-sequence v enters once per sequence, not once per window -----


def test_first_static_enters_only_at_the_sequence_start_across_windows():
    path = os.path.join(SPECS, "captioning.rnn")
    m = compile_spec(path, dims={"V": 5, "H": 4, "F": 3})
    _, params, inputs, targets, _ = random_data(m.graph, 6, 2, seed=2)
    whole = m.forward(params, inputs)["s"]
    first = {"x": inputs["x"][:3], "img": inputs["img"]}
    rest = {"x": inputs["x"][3:], "img": inputs["img"]}
    a, carry = m.forward(params, first, return_carry=True)
    b = m.forward(params, rest, carry=carry)
    assert rel(np.concatenate([a["s"], b["s"]]), whole) < 1e-14
    # and the gradients of the second window equal the unrolled reference with a carry
    from rnnc.grad import grad
    from rnnc.interpret import interpret
    from rnnc.unroll import unroll

    tg = {"y": targets["y"][3:]}
    _, grads = m.loss_and_grads(params, rest, tg, carry=carry)
    gd = grad(unroll(m.graph, {"x": 3}, carried=True))
    vals = interpret(gd, params, rest, tg, carry={k: v for k, v in carry.items()})
    for name, n in gd.graph["grads"].items():
        if name in params:
            assert rel(grads[name], vals[n], 1e-12) < 1e-10, name


# ----- 4. the carry out of a window honours lengths -----


@pytest.mark.parametrize("spec", ["elman", "lstm", "higher_order"])
def test_return_carry_is_each_sequence_state_at_its_length(spec):
    path = os.path.join(SPECS, spec + ".rnn")
    m = compile_spec(path, dims={k: v for k, v in {"V": 5, "H": 4}.items()})
    _, params, inputs, _, _ = random_data(m.graph, 7, 3, seed=4)
    L = {"x": np.array([7, 3, 5])}
    _, carry = m.forward(params, inputs, lengths=L, return_carry=True)
    for b, n in enumerate(L["x"]):
        _, c1 = m.forward(params, {k: v[:n, b : b + 1] for k, v in inputs.items()},
                              return_carry=True)  # fmt: skip
        for key in carry:
            assert rel(carry[key][:, b], c1[key][:, 0]) < 1e-14, (key, b)


# ----- 6. lengths keys name a time domain; a domain is named after its first input -----

TWO_INPUTS = """model m {
  dim H = 3
  input a[H] : sequence
  input b[H] : sequence like a
  target y[H] : sequence
  param W[H, H]
  h = tanh(b + W @ h[t-1])
  q = h + a
  loss = mse(q, y)
}"""


def test_domain_is_named_after_the_first_declared_input():
    m = compile_spec(TWO_INPUTS)
    assert set(m.graph.graph["domains"]) == {"a"}


def test_unknown_lengths_key_is_refused_with_the_domains_that_exist():
    m = compile_spec(TWO_INPUTS)
    _, params, inputs, targets, _ = random_data(m.graph, 5, 2, seed=0)
    with pytest.raises(KeyError, match=r"'b'.*'a'"):
        m.loss(params, inputs, targets, lengths={"b": np.array([2, 5])})
    short = m.loss(params, inputs, targets, lengths={"a": np.array([2, 5])})["loss"]
    full = m.loss(params, inputs, targets)["loss"]
    assert short != full


# ----- 7. padded steps of an output are zero -----


def test_padded_output_steps_are_zero():
    m = compile_spec(os.path.join(SPECS, "lstm.rnn"), dims={"V": 5, "H": 4})
    _, params, inputs, _, _ = random_data(m.graph, 6, 3, seed=5)
    L = np.array([6, 2, 4])
    out = m.forward(params, inputs, lengths={"x": L})
    full = m.forward(params, inputs)
    for key, v in out.items():
        if v.ndim != 3:
            continue
        for b, n in enumerate(L):
            assert not np.any(v[n:, b]), key
            assert rel(v[:n, b], full[key][:n, b]) < 1e-14, key


# ----- 9. rnnc grad prints by precedence -----


class FakeEmitter:
    """Just what math_prec reads: a graph, which nodes are inlined, names."""

    def __init__(self, g, inline):
        self.g, self.inline = g, inline

    def name(self, n):
        return self.g.nodes[n]["name"] or f"%{n}"


def test_explain_parenthesizes_by_precedence_not_by_leading_parenthesis():
    from rnnc.explain import math_of
    from rnnc.graph import add_op, new_graph

    g = new_graph()
    a, b, c, x = (add_op(g, "input", (), v, dom="static") for v in "abcx")
    for n in (a, b, c, x):
        g.nodes[n]["shape"], g.nodes[n]["level"] = (3,), "static"
    ab = add_op(g, "add", [(a, 0), (b, 0)])
    abc = add_op(g, "sub", [(ab, 0), (c, 0)])  # (a + b) - c: its text begins with '('? no: a + b - c
    top = add_op(g, "mul", [(x, 0), (abc, 0)])
    neg = add_op(g, "sub", [(c, 0), (abc, 0)])
    em = FakeEmitter(g, {ab, abc})
    assert math_of(em, top, None) == "x ⊙ (a + b - c)"
    assert math_of(em, neg, None) == "c - (a + b - c)"
    mul = add_op(g, "mul", [(ab, 0), (c, 0)])
    em = FakeEmitter(g, {ab, mul})
    out = add_op(g, "sub", [(mul, 0), (x, 0)])  # text of mul begins with '(' but is not enclosed
    assert math_of(em, out, None) == "(a + b) ⊙ c - x"
    out2 = add_op(g, "mul", [(x, 0), (out, 0)])
    em = FakeEmitter(g, {ab, mul, out})
    assert math_of(em, out2, None) == "x ⊙ ((a + b) ⊙ c - x)"


# ----- 10. sigmoid does not underflow to 0; cross_entropy(sigmoid(z)) is fused -----


def test_sigmoid_is_exact_far_below_zero_in_float32():
    x = np.array([-20.0, -90.0, 0.0, 30.0], np.float32)
    y = kernels.sigmoid(x)
    assert y.dtype == np.float32
    want = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert np.all(np.abs(y - want) <= 1e-6 * want)


def test_cross_entropy_of_sigmoid_at_minus_20_in_float32():
    text = """model m {
  dim K = 2
  input x[K] : sequence
  target y : sequence of class(K)
  param b[K]
  loss = cross_entropy(sigmoid(x + b), y)
}"""
    m = compile_spec(text)
    params = {"b": np.array([-20.0, 0.0], np.float32)}
    ins, tgs = {"x": np.zeros((1, 1, 2), np.float32)}, {"y": np.array([[0]])}
    loss, grads = m.loss_and_grads(params, ins, tgs)
    assert abs(loss - 20.0) < 1e-5
    assert abs(grads["b"][0] - (-1.0)) < 1e-6 and grads["b"][1] == 0


# ----- 11. comments are collected per parse, also from several threads -----


def test_parses_in_threads_keep_their_own_comments():
    # long enough that the interpreter switches threads in the middle of a parse
    lines = "".join(f"  s{j} = tanh(x)  # line {j}\n" for j in range(300))
    texts = [f"# file {i}\nmodel m{i} {{\n  input x[2] : sequence\n{lines}}}\n" for i in range(4)]
    start, bad = threading.Barrier(4), []

    def work(i):
        start.wait()
        for _ in range(5):
            p = parse(texts[i])
            if p.comments[0][2] != f"# file {i}" or len(p.comments) != 301:
                bad.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not bad


# ----- 12, 13: the optimizer's fusions never close a cycle nor join two recurrences -----


@pytest.mark.parametrize(
    "body",
    [
        "h = tanh(A @ x + tanh(B @ x + C @ h[t-1]))\n  loss = mse(h, y)",
        "h = tanh(A @ x + C @ h[t-1])\n  b = tanh(B @ x + D @ b[t+1])\n  loss = mse(h + b, y)",
        "h = tanh(A @ x + C @ h[t-1] + D @ b[t-1])\n  b = sigmoid(B @ x + h)\n  loss = mse(b, y)",
    ],
    ids=["bias-depends-on-loop", "two-directions", "bias-same-step"],
)
def test_fusions_keep_the_schedule_valid(body):
    three_way(HEAD % body, lengths=True)


GRU_PACKED = """use GRU

model m {
  dim I = 3, H = 4
  input x[I] : sequence
  target y[H] : sequence
  h = GRU(x, H=H)
  loss = mse(h, y)
}"""


def test_gru_in_pytorch_packed_layout_compiles_exactly():
    m, params, inputs, *_ = three_way(GRU_PACKED, lengths=True)
    # a hand loop of PyTorch's GRU equations
    x, H = inputs["x"], 4
    Wi, Wh = params["h.weight_ih"], params["h.weight_hh"]
    bi, bh = params["h.bias_ih"], params["h.bias_hh"]
    h, hs = np.zeros((x.shape[1], H)), []
    for t in range(x.shape[0]):
        gi, gh = x[t] @ Wi.T + bi, h @ Wh.T + bh
        r = 1 / (1 + np.exp(-(gi[:, :H] + gh[:, :H])))
        z = 1 / (1 + np.exp(-(gi[:, H : 2 * H] + gh[:, H : 2 * H])))
        n = np.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
        h = (1 - z) * n + z * h
        hs.append(h)
    assert rel(m.forward(params, inputs)["h"], np.stack(hs)) < 1e-13


# ----- 5. a modifier after a call -----


def test_init_after_the_call_is_a_located_error():
    text = LEARNED_INIT.replace("h = RNN(x, H=H, init=h0)", "h = RNN(x, H=H) init=h0")
    with pytest.raises(RnncError) as info:
        compile_spec(text)
    e = info.value
    assert e.code == "E106" and (e.span.line, e.span.col) == (10, 19)
    assert "inside the call" in e.hint


# ----- 14, 15: hostile sizes and messages -----


def check_error(text: str) -> RnncError:
    from rnnc.compiler import front

    with pytest.raises(RnncError) as info:
        front(text, "case.rnn")
    return info.value


def test_a_5000_digit_dim_and_a_10000_term_dim_are_located_errors():
    head = "model m {\n  dim I = 3, H = %s\n  input x[I] : sequence\n}\n"
    e = check_error(head % ("9" * 5000))
    assert (e.span.line, e.span.col, e.code) == (2, 18, "E109")
    e = check_error(head % "+".join(["1"] * 10_000))
    assert e.code == "E104" and "more than 500 terms" in e.message


def test_a_flat_sum_of_500_terms_compiles_and_is_right():
    text = ("model m {\n  dim I = 3\n  input x[I] : sequence\n  target y[I] : sequence\n"
            "  s = " + " + ".join(["x"] * 500) + "\n  loss = mse(s, y)\n}\n")  # fmt: skip
    m = compile_spec(text)
    x = np.random.default_rng(0).normal(size=(2, 1, 3))
    assert rel(m.forward({}, {"x": x})["s"], 500 * x) < 1e-14
    e = check_error(text.replace(" + ".join(["x"] * 500), " + ".join(["x"] * 501)))
    assert e.code == "E104" and "more than 500 terms" in e.message


def test_nul_byte_is_refused_where_it_is_and_a_bom_is_accepted():
    e = check_error("model m {\n  dim H = 4  # a \0 byte\n}\n")
    assert (e.span.line, e.span.col, e.code) == (2, 18, "E101")
    from rnnc.compiler import front

    _, g = front("\ufeffmodel m {\n  dim H = 4\n  input x[H] : sequence\n}\n", "bom.rnn")
    assert g.graph["model"] == "m"


def test_a_long_line_is_shown_as_a_window_around_the_error(tmp_path, capsys):
    from rnnc.cli import main

    path = tmp_path / "long.rnn"
    path.write_text("model m {\n  dim I = 3\n  input x[I] : sequence\n  s = tanh("
                    + " " * 400_000 + "qq)\n}\n")  # fmt: skip
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert len(err) < 1000 and "'qq' is not defined" in err
    shown, carets = err.splitlines()[1:3]
    assert shown.index("qq") == carets.index("^")


def test_check_time_is_linear_in_stacked_layers():
    import time

    from rnnc.compiler import front

    with open(os.path.join(SPECS, "tagger.rnn")) as f:
        cell = f.read().split("model")[0]
    def timed(n):
        text = cell + ("model m {\n  dim V = 5, H = 8\n  input x[V] : sequence\n"
                       f"  h = stack({n}) LSTM(x, H=H)\n}}\n")  # fmt: skip
        t0 = time.perf_counter()
        front(text, "s.rnn")
        return time.perf_counter() - t0
    timed(2)
    small, big = min(timed(2) for _ in range(3)), min(timed(16) for _ in range(3))
    assert big / small < 8 * 2.5  # 8x the layers: about 8x the time, not 64x


def test_a_fused_bias_that_is_another_fused_add():
    # W1 @ h[t-2] and W2 @ h[t-2] fuse; the second add's "bias" is the first add
    three_way(HEAD % "s = tanh(A @ x + C @ s[t-2] + D @ s[t-2])\n  loss = mse(s, y)", lengths=True)


def test_a_per_sequence_score_read_by_per_step_labels():
    # first(...) is one value per sequence; the labels are per step: the loss repeats it
    text = """model m {
  dim I = 3, H = 4, K = 3
  input x[I] : sequence
  target c : sequence of class(K)
  param W[H, H], U[H, I], V[K, H]
  s = tanh(W @ s[t-1] + U @ x)
  loss = cross_entropy(softmax(first(V @ s)), c)
}"""
    three_way(text, lengths=True)
    three_way(text.replace("softmax(first(V @ s))", "first(softmax(V @ s))"))


def test_messages_name_no_internal_op(tmp_path, capsys):
    from rnnc.cli import main

    # an operator's IR name is no function a spec can call, nor a suggestion
    e = check_error(HEAD % "s = subb(U @ x, A @ x)\n  loss = mse(s, y)")
    assert e.code == "E210" and "sub'" not in (e.hint or "")
    e = check_error(HEAD % "s = sub(U @ x, A @ x)\n  loss = mse(s, y)")
    assert e.code == "E210"
    # a shape that cannot be inferred is named by its source text, never %15
    e = check_error("cell C(x[I]) -> h[H] {\n  h = tanh(x[0:H] + h[t-1])\n}\n"
                    "model m {\n  dim I = 6\n  input x[I] : sequence\n  h = C(x)\n}\n")  # fmt: skip
    assert e.code == "E305" and "'x[0:H]'" in e.message and "%" not in e.message
    # a loss that is not one number: an error, and no "ok" beside it
    path = tmp_path / "lossh.rnn"
    path.write_text(HEAD % "h = tanh(W @ h[t-1] + U @ x)\n  loss = h")
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "ok" not in out and "error[E408]" in err and ":7:3:" in err  # at `loss = h`


def test_lengths_and_a_carry_together_equal_the_reference():
    # a window that continues sequences (carry) and ends each at its own length
    from rnnc.grad import grad
    from rnnc.interpret import interpret
    from rnnc.unroll import unroll

    m = compile_spec(os.path.join(SPECS, "elman.rnn"), dims={"V": 5, "H": 4})
    _, params, inputs, targets, _ = random_data(m.graph, 6, 3, seed=1)
    first = {k: v[:3] for k, v in inputs.items()}
    rest, tgs = {k: v[3:] for k, v in inputs.items()}, {k: v[3:] for k, v in targets.items()}
    _, carry = m.forward(params, first, return_carry=True)
    L = {"x": np.array([3, 1, 2])}
    loss, grads = m.loss_and_grads(params, rest, tgs, lengths=L, carry=carry)
    gd = grad(unroll(m.graph, {"x": 3}, masked=True, carried=True))
    vals = interpret(gd, params, rest, tgs, lengths=L, carry=carry)
    assert abs(loss - float(vals[gd.graph["loss"]])) < 1e-12 * abs(loss)
    for name in params:
        assert rel(grads[name], vals[gd.graph["grads"][name]]) < 1e-12, name
