"""The rewrite rules: each one fires where it should, and the program still means the same."""

from __future__ import annotations

import functools
import os

from rnnc import compiler
from rnnc.compiler import front
from rnnc.graph import operands, pretty
from rnnc.optimize import optimize

# what the optimizer makes of a spec, read in the NumPy target's text (the readable reference)
compile_spec = functools.partial(compiler.compile_spec, target="numpy")

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")


def graph_of(body: str):
    text = (
        "model m {\n  dim H = 3\n  input x[H] : sequence\n  param W[H, H], U[H, H], b[H]\n"
        + body
        + "\n}\n"
    )
    return front(text, "m.rnn")[1]


def ops(g) -> list[str]:
    return sorted(d["op"] for _, d in g.nodes(data=True))


def test_algebra_and_constant_folding():
    g = optimize(graph_of("  s = (x * 1 + 0) * (2 - 1) + -(-b)"))
    assert "mul" not in ops(g) and "neg" not in ops(g) and "sub" not in ops(g)
    assert ops(g).count("add") == 1  # x + b is all that is left


def test_common_subexpressions_are_one():
    g = optimize(graph_of("  a = tanh(W @ x)\n  c = tanh(W @ x) + a"))
    assert ops(g).count("matmul") == 1 and ops(g).count("tanh") == 1


def test_dead_code_is_removed():
    from rnnc.graph import add_op

    g = graph_of("  s = tanh(W @ x)\n  unused_tmp = U @ s")
    s = g.graph["outputs"]["s"]
    dead = add_op(g, "exp", [(add_op(g, "sigmoid", [(s, 0)]), 0)])  # read by nothing
    out = optimize(g, fuse=False)
    assert dead not in out and "exp" not in ops(out) and "sigmoid" not in ops(out)
    assert "unused_tmp" in out.graph["outputs"]  # a named output is live
    assert ops(out).count("matmul") == 2


def test_gate_fusion_and_hoisting_make_one_gemm_per_step():
    m = compile_spec(os.path.join(SPECS, "lstm.rnn"))
    src = m.source
    forward = src[src.index("def forward(") : src.index("def loss(")]
    loop = forward[forward.index("for t in range") :].split("\n    #", 1)[0]
    loop = loop.split("\n    out =")[0]
    code = [line for line in loop.splitlines() if not line.strip().startswith("#")]
    assert sum(line.count(" @ ") for line in code) == 1, loop  # four gates, one product a step
    assert "linear(h_x, np.concatenate(" in forward  # the input half, hoisted: one GEMM


def test_backward_of_fused_gates_is_one_gemm_per_step():
    m = compile_spec(os.path.join(SPECS, "gru.rnn"))
    src = m.source
    body = src[src.index("def loss_and_grads(") :]
    back = body[body.index("for t in range(T_x - 1, -1, -1):") :].split("\n    del", 1)[0]
    code = [line for line in back.splitlines() if not line.strip().startswith("#")]
    assert sum(line.count(" @ ") for line in code) == 1, back


def test_pretty_prints_delays_like_the_spec():
    g = graph_of("  s = tanh(W @ x + U @ s[t-1])")
    assert "s[t-1]" in pretty(g)


def test_plan_printer_names_loops_and_directions():
    from rnnc.schedule import describe

    m = compile_spec(os.path.join(SPECS, "birnn.rnn"))
    text = describe(m.plans["loss_and_grads"])
    assert text.count("loop forward over x") == 2 and text.count("loop backward over x") == 2
    lines = text.splitlines()
    # BPTT: each direction's adjoint loop runs the other way; weight gradients are one product
    assert "loop backward over x: dh.fwd.h" in " ".join(lines).replace(", %", " %")
    assert "once dh.fwd.W = outer" in lines and "once dh.bwd.U = outer" in lines


def loop_lines(src: str, function: str, direction: str) -> list[str]:
    body = src[src.index(f"def {function}(") :]
    head = "for t in range(T_x):" if direction == "forward" else "for t in range(T_x - 1, -1, -1):"
    lines = []
    for line in body[body.index(head) :].splitlines()[1:]:
        if not line.startswith("        "):  # the loop's body ends where its indentation does
            break
        if not line.strip().startswith("#"):
            lines.append(line.strip())
    return lines


def test_fused_gates_share_one_bias_add_and_one_sigmoid_over_adjacent_gates():
    m = compile_spec(os.path.join(SPECS, "lstm.rnn"))
    code = loop_lines(m.source, "forward", "forward")
    assert "np.concatenate((h_bf, h_bi, h_bg, h_bo,), axis=-1)" in m.source  # one bias vector
    assert sum(line.count(" + ") for line in code if " @ " in line) == 1  # one add over 4 gates
    # f and i are adjacent: one sigmoid over both, read as halves; o is its own call
    assert sum(line.count("sigmoid(") for line in code) == 2, code
    assert sum(line.count("np.tanh(") for line in code) == 2, code  # g and tanh(c)


def test_halves_of_one_stored_value_are_read_as_views_not_kept_twice():
    m = compile_spec(os.path.join(SPECS, "lstm.rnn"))
    src = m.source[m.source.index("def loss_and_grads(") :]
    src = src[: src.index("def loss_and_all_grads(")]
    assert "h_f = np.empty" not in src and "h_i = np.empty" not in src
    back = loop_lines(m.source, "loss_and_grads", "backward")
    assert any("[t][..., 0:" in line for line in back), back  # f read from its sigmoid's buffer


def test_backward_loop_carries_one_running_adjoint_like_hand_written_bptt():
    m = compile_spec(os.path.join(SPECS, "gru.rnn"))
    back = loop_lines(m.source, "loss_and_grads", "backward")
    import re

    later = {name for line in back for name in re.findall(r"(\w+)\[t \+ 1\]", line)}
    running = {name for line in back for name in re.findall(r"\b(\w+_run)\b", line)}
    # dh from z * h[t-1] and from U @ h[t-1]: one running [B, H] value, no [T + 1] array
    assert not later and running == {"dh_h_next_run"}, back
    assert back[-1] == "dh_h_next_run = dh_h_next_t", back  # handed on when the step is done
    assert "dh_h_next = np.empty(" not in m.source
    assert "dh_h_init = edge_first(dh_h_next_run, carry is not None)" in m.source


def test_common_factor_is_pulled_out():
    g = optimize(graph_of("  s = tanh(x) * b + tanh(x) * (W @ x)\n  r = -(b * x) + b * tanh(x)"))
    # (tanh(x) * (b + W @ x)) and b * (tanh(x) - x): one product each
    assert ops(g).count("mul") == 2, pretty(g)
    assert ops(g).count("neg") == 0


def test_slices_fold():
    from rnnc.graph import add_op
    from rnnc.optimize import simplify

    g = graph_of("  s = tanh(x)")
    simplify(g)
    x = g.graph["outputs"]["s"]
    whole = add_op(g, "slice", [(x, 0)], start=0, stop=3)
    inner = add_op(g, "slice", [(x, 0)], start=1, stop=3)
    outer = add_op(g, "slice", [(inner, 0)], start=1, stop=2)
    joined = add_op(g, "concat", [(whole, 0), (x, 0)])
    pair = add_op(g, "concat", [(inner, 0), (x, 0)])
    back = add_op(g, "slice", [(x, 0)], start=0, stop=1)
    glued = add_op(g, "concat", [(back, 0), (inner, 0)])
    g.graph["outputs"].update(a=outer, b=joined, c=pair, d=glued)
    simplify(g)
    out = g.graph["outputs"]
    assert g.nodes[out["a"]]["op"] == "slice" and g.nodes[out["a"]]["attrs"]["start"] == 2
    assert operands(g, out["a"]) == [(x, 0)]  # x[1:3][1:2] -> x[2:3]
    assert operands(g, out["b"]) == [(x, 0), (x, 0)]  # x[0:3] of a 3-wide x is x
    assert out["d"] == x  # concat(x[0:1], x[1:3]) is x


TWO_STATES = """model m {
  dim H = 3, I = 2
  input x[I] : sequence
  target y[H] : sequence
  param W[H, H], U[H, H], V[H, I], C[H, H], b[H]
  h = tanh(W @ h[t-1] + V @ x + U @ c[t-1] + b)
  c = tanh(C @ h + c[t-1])
  loss = mse(h, y)
}
"""


def test_two_products_of_loop_values_join_into_one_gemm_a_step():
    """W @ h[t-1] + U @ c[t-1] -> [W U] @ concat(h[t-1], c[t-1]): with C @ h, two products a
    step where there were three, forward and backward; exact."""
    import numpy as np
    from helpers import random_data, rel

    m = compile_spec(TWO_STATES)
    src = m.source
    forward = src[src.index("def forward(") : src.index("def loss(")]
    loop = forward[forward.index("for t in range") :].split("\n    out =")[0]
    code = [line for line in loop.splitlines() if not line.strip().startswith("#")]
    assert sum(line.count(" @ ") for line in code) == 2, loop  # [W U] @ concat(h, c), then C @ h
    body = src[src.index("def loss_and_grads(") :]
    back = body[body.index("for t in range(T_x - 1, -1, -1):") :].split("\n    del", 1)[0]
    assert sum(line.count(" @ ") for line in back.splitlines() if not line.strip().startswith("#")) == 2, back
    plain = compile_spec(TWO_STATES, optimize=False)
    _, params, inputs, targets, L = random_data(m.graph, 6, 3, seed=1, lengths=True)
    want = plain.loss_and_grads(params, inputs, targets, lengths=L)
    got = m.loss_and_grads(params, inputs, targets, lengths=L)
    assert abs(got[0] - want[0]) < 1e-12 and all(rel(got[1][k], v) < 1e-12 for k, v in want[1].items())
    assert np.isfinite(got[0])


def test_input_feeding_is_two_gemms_a_decoder_step():
    m = compile_spec(os.path.join(SPECS, "attention_dot.rnn"))
    src = m.source
    forward = src[src.index("def forward(") : src.index("def loss(")]
    loop = forward[forward.index("for t in range(T_tgt_in)") :].split("\n    out =")[0]
    code = [line for line in loop.splitlines() if not line.strip().startswith("#")]
    assert sum(line.count(" @ ") for line in code) == 2, loop


STATIC_EVERY_STEP = """model m {
  dim H = 4, I = 3, F = 2
  input x[I] : sequence
  input img[F] : static
  target y[H] : sequence
  param W[H, H], U[H, I], P[H, F], b[H]
  h = tanh(W @ h[t-1] + U @ x + P @ img + b)
  loss = mse(h, y)
}
"""


def test_a_per_sequence_value_read_every_step_sums_its_adjoint_inside_the_loop():
    """P @ img enters every step: its adjoint, a sum over the steps, is one running [B, H]
    value of the backward loop, and the gradients equal the unrolled reference's."""
    from helpers import random_data, reference, rel

    m = compile_spec(STATIC_EVERY_STEP)
    assert len(m.plans["loss_and_grads"].accumulate) == 1
    assert "zeros((B,) + (4,), dt)" in m.source and " += dh" in m.source
    for lengths in (False, True):
        Ts, params, inputs, targets, L = random_data(m.graph, 6, 3, seed=3, lengths=lengths)
        loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
        ref_loss, ref_grads, _ = reference(m.graph, Ts, params, inputs, targets, L)
        assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
        assert all(rel(grads[k], g) < 1e-12 for k, g in ref_grads.items())
