"""The rewrite rules: each one fires where it should, and the program still means the same."""

from __future__ import annotations

import os

from rnnc.compiler import compile_spec, front
from rnnc.graph import pretty
from rnnc.optimize import optimize

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
    g = optimize(graph_of("  s = tanh(W @ x)\n  unused_tmp = U @ s"))
    assert "unused_tmp" in g.graph["outputs"]  # a named output is live
    g2 = optimize(graph_of("  s = tanh(W @ x + 0 * (U @ x))"), fuse=False)
    assert ops(g2).count("matmul") >= 1


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
