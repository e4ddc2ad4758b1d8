"""Variable-length batches against running each sequence alone; truncated BPTT against the
unrolled reference with the same cuts."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import grad_scale, random_data, rel, small_dims

from rnnc.compiler import compile_spec
from rnnc.grad import grad
from rnnc.interpret import interpret
from rnnc.unroll import unroll

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")
LENGTH_SPECS = ["lstm", "gru", "birnn", "many_to_one", "backward", "encoder_decoder",
                "pyramidal", "higher_order", "captioning", "deep_birnn"]  # fmt: skip


def cut(arrays, m_table, domains, b, L, steps):
    """Sequence b alone, each domain cut to its own length."""
    out = {}
    for name, a in arrays.items():
        level = m_table[name][1]
        if level == "static":
            out[name] = a[b : b + 1]
        else:
            base = domains[level]["halves"]
            n = L[base][b] // 2 if base else L[level][b]
            out[name] = a[:n, b : b + 1]
    return out


@pytest.mark.parametrize("name", LENGTH_SPECS)
def test_lengths_equal_each_sequence_alone(name):
    path = os.path.join(SPECS, name + ".rnn")
    m = compile_spec(path, dims=small_dims(path))
    B = 4
    Ts, params, inputs, targets, L = random_data(m.graph, 8, B, seed=3, lengths=True)
    domains = m.graph.graph["domains"]
    for dom in L:  # at least 2 steps, so that pairs() has something to pair
        L[dom] = np.maximum(L[dom], 2)
    loss, grads = m.loss_and_grads(params, inputs, targets, lengths=L, with_inputs=True)
    total_loss, total = 0.0, {k: np.zeros_like(v) for k, v in params.items()}
    for b in range(B):
        ins = cut(inputs, m.inputs, domains, b, L, Ts)
        tgs = cut(targets, m.targets, domains, b, L, Ts)
        lb, gb = m.loss_and_grads(params, ins, tgs, with_inputs=True)
        total_loss += lb / B
        for k in params:
            total[k] += gb[k] / B
        for k, v in ins.items():
            if k in grads and v.ndim == 3:  # the input gradient, up to this sequence's end
                assert rel(grads[k][: v.shape[0], b : b + 1], gb[k] / B) < 1e-10
                assert not np.any(grads[k][v.shape[0] :, b]), "no gradient past the end"
    assert abs(loss - total_loss) < 1e-10 * abs(total_loss)
    floor = 1e-8 * grad_scale(total)
    for k in params:
        assert rel(grads[k], total[k], floor) < 1e-9, k


def reference_tbptt(m, params, inputs, targets, window):
    """Window by window over the unrolled DAG, carrying the last states' values across cuts."""
    g = m.graph
    T = next(iter(inputs.values())).shape[0]
    carry, loss, grads = None, 0.0, {k: 0.0 for k in params}
    states = {}
    for u, _, e in g.edges(data=True):
        if e["delay"] > 0:
            states[g.nodes[u]["name"]] = max(states.get(g.nodes[u]["name"], 0), e["delay"])
    for start in range(0, T, window):
        ins = {k: v[start : start + window] for k, v in inputs.items()}
        tgs = {k: v[start : start + window] for k, v in targets.items()}
        steps = next(iter(ins.values())).shape[0]
        dag = unroll(g, {d: steps for d in g.graph["domains"]}, carried=carry is not None)
        gd = grad(dag)
        vals = interpret(gd, params, ins, tgs, carry=carry)
        loss += float(vals[gd.graph["loss"]])
        for k in params:
            grads[k] = grads[k] + vals[gd.graph["grads"][k]]
        new = {}
        for name, K in states.items():
            n = next(n for n, d in g.nodes(data=True) if d["name"] == name)
            rows = [dag_value(dag, vals, n, s, carry, name) for s in range(steps - K, steps)]
            new[name] = np.stack(rows)
        carry = new
    return loss, grads


def dag_value(dag, vals, n, s, carry, name):
    if s < 0:
        return carry[name][s] if carry is not None else 0.0
    c = next(c for c, d in dag.nodes(data=True) if d.get("orig") == (n, s))
    return vals[c]


@pytest.mark.parametrize("name", ["lstm", "gru", "higher_order", "elman"])
def test_truncated_bptt_equals_reference_with_the_same_cuts(name):
    path = os.path.join(SPECS, name + ".rnn")
    m = compile_spec(path, dims=small_dims(path))
    _Ts, params, inputs, targets, _ = random_data(m.graph, 11, 2, seed=5)
    window = 4
    carry, loss, grads = None, 0.0, {k: 0.0 for k in params}
    for start in range(0, 11, window):
        ins = {k: v[start : start + window] for k, v in inputs.items()}
        tgs = {k: v[start : start + window] for k, v in targets.items()}
        lw, gw, carry = m.loss_and_grads(params, ins, tgs, carry=carry, return_carry=True)
        loss += lw
        for k in params:
            grads[k] = grads[k] + gw[k]
    ref_loss, ref_grads = reference_tbptt(m, params, inputs, targets, window)
    assert abs(loss - ref_loss) < 1e-10 * abs(ref_loss)
    for k in params:
        assert rel(grads[k], ref_grads[k], 1e-8 * grad_scale(ref_grads)) < 1e-10, k
    # and the cut matters: full BPTT over all 11 steps gives different gradients
    _, full = m.loss_and_grads(params, inputs, targets)
    assert max(rel(full[k], grads[k]) for k in params) > 1e-6
