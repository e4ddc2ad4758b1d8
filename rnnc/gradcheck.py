"""Compiled gradients against central finite differences, in float64 (`rnnc gradcheck`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .compiler import Model, compile_spec


@dataclass
class Row:
    name: str
    shape: tuple
    checked: int
    error: float  # ||analytic - numeric|| / ||numeric|| over the checked entries


def random_batch(m: Model, T: int, B: int, seed: int, dtype=np.float64):
    """Random inputs, targets and lengths (None) fitting the model's declarations."""
    rng = np.random.default_rng(seed)
    halves = {d: info["halves"] for d, info in m.graph.graph["domains"].items()}

    def steps(dom: str) -> int:
        return steps(halves[dom]) // 2 if halves.get(dom) else T

    def make(table):
        out = {}
        for name, (shape, level, labels) in table.items():
            lead = (steps(level), B) if level != "static" else (B,)
            if labels:
                out[name] = rng.integers(0, shape[0], size=lead)
            else:
                out[name] = rng.normal(size=lead + tuple(shape)).astype(dtype)
        return out

    return make(m.inputs), make(m.targets), None


def gradcheck(spec: str, dims=None, model=None, T=5, batch=2, seed=0, eps=1e-6,
              samples=24) -> list[Row]:  # fmt: skip
    m = compile_spec(spec, dims=dims, model=model)
    params = m.init_params(seed, np.float64)
    rng = np.random.default_rng(seed + 1)
    for k in params:  # non-zero biases, so that every path is exercised
        params[k] = params[k] + rng.normal(0, 0.1, params[k].shape)
    inputs, targets, lengths = random_batch(m, T, batch, seed)
    _, grads = m.loss_and_grads(params, inputs, targets, lengths=lengths, with_inputs=True)
    rows = []
    for name, p in [*params.items(), *((k, v) for k, v in inputs.items() if k in grads)]:
        tensors = params if name in params else inputs
        flat = tensors[name].reshape(-1)
        idx = rng.choice(flat.size, min(samples, flat.size), replace=False)
        num = np.empty(len(idx))
        for j, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + eps
            lp = m.loss(params, inputs, targets, lengths=lengths)["loss"]
            flat[i] = old - eps
            lm = m.loss(params, inputs, targets, lengths=lengths)["loss"]
            flat[i] = old
            num[j] = (lp - lm) / (2 * eps)
        ana = np.asarray(grads[name]).reshape(-1)[idx]
        scale = max(np.linalg.norm(num), np.linalg.norm(ana), 1e-12)
        rows.append(Row(name, tuple(p.shape), len(idx), float(np.linalg.norm(ana - num) / scale)))
    return rows
