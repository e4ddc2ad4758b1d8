"""Decoding: a model with a `generate x = onehot(sample(o[t-1]))` rule, run one step at a
time with its carried state — greedy, sampling (temperature, top-k) or beam search (width,
length normalization, an end token per sequence).

    m = rnnc.compile_spec("lm.rnn", dims={"V": 65})
    out = decode(m, params, steps=200, prime=[[3, 17]], method="beam", width=5, end=0)
    out.tokens[0], out.scores[0]

A step feeds the previous token (one-hot) to the model with the state carried from the step
before (`forward(..., carry=..., return_carry=True)`, as truncated BPTT windows do), so the
distribution a step sees equals the full forward pass's on the decoded prefix. Static inputs
(an image's features for captioning) are passed at every step; the model's `first(...)`
reads them at the very first step only, as in training."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from . import syntax as S
from .compiler import Model
from .errors import RnncError
from .files import on_host

METHODS = ("greedy", "sample", "beam")


@dataclass
class Decoded:
    """Per sequence: the tokens after the prime (up to and with the end token), their total
    log-probability, and (greedy and sample) each step's distribution."""

    tokens: list[list[int]]
    scores: list[float]
    probs: list[np.ndarray] = field(default_factory=list)  # [steps, B, V]


def sampled_output(m: Model, name: str) -> str:
    """The output a `generate NAME = onehot(sample(o[t-1]))` rule samples from: 'o'."""
    rule = m.graph.graph["generate"][name]
    match rule.expr:
        case S.Call("onehot", (S.Call("sample", (S.TimeRef(o, 1),)),)):
            return o
    raise RnncError(
        "decoding samples through rules of the form `generate x = onehot(sample(o[t-1]))`",
        rule.span,
        hint="write the rule that way: o is the distribution over the next input",
        code="E542",
    )


def generate_rule(m: Model) -> tuple[str, str, int]:
    """(the input the rule feeds, the distribution it samples, its size V)."""
    rules = m.graph.graph["generate"]
    if len(rules) != 1:
        raise RnncError("decoding needs exactly one `generate x = ...` rule in the model", code="E542")
    (x_name,) = rules
    return x_name, sampled_output(m, x_name), m.inputs[x_name][0][0]


class Stepper:
    """The model one step (or one prime) at a time, its state carried between calls. The
    other inputs (`given`) come with every call: static ones ([B, ...], an image's features)
    and sequences of other clocks ([S, B, ...], an encoder's source, with their `lengths`);
    only the decoder's own states are carried, so an encoder runs from its start each call."""

    def __init__(self, m: Model, params: dict, given: dict | None, lengths: dict | None = None):
        self.m, self.params = m, params
        self.x, self.o, self.V = generate_rule(m)
        self.given = {k: np.asarray(v) for k, v in (given or {}).items()}
        self.seqs = {k for k in self.given if m.inputs[k][1] != "static"}
        self.lengths = {k: np.asarray(v) for k, v in (lengths or {}).items()}
        dom = m.inputs[self.x][1]
        self.own = {d["name"] for _, d in m.graph.nodes(data=True) if d["name"] and d["level"] == dom}
        self.carry: dict | None = None

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [T, B] -> the distribution after the last of them, [B, V] (float64)."""
        x = np.eye(self.V)[tokens]
        out, carry = self.m.forward(self.params, {self.x: x, **self.given}, lengths=self.lengths or None,
                                    carry=self.carry, return_carry=True)  # fmt: skip
        self.carry = {k: v for k, v in carry.items() if k in self.own}
        return np.asarray(on_host(out[self.o][-1]), np.float64)

    def keep(self, rows: np.ndarray) -> None:
        """Keep (and repeat) these batch rows of the state and of the other inputs."""
        self.carry = None if self.carry is None else {k: v[:, rows] for k, v in self.carry.items()}
        self.given = {k: v[:, rows] if k in self.seqs else v[rows] for k, v in self.given.items()}
        self.lengths = {k: v[rows] for k, v in self.lengths.items()}

    def row(self, i: int) -> Stepper:
        """A stepper for sequence i alone, from its start."""
        one = copy.copy(self)
        one.carry = None
        one.keep(np.array([i]))
        return one


def decode(m: Model, params: dict, steps: int, prime, static: dict | None = None,
           method: str = "greedy", temperature: float = 1.0, top_k: int | None = None,
           width: int = 4, end: int | None = None, alpha: float = 0.0, seed: int = 0,
           lengths: dict | None = None) -> Decoded:  # fmt: skip
    """Up to `steps` tokens after each prime (prime: [B, P] token ids, P >= 1; static: the
    model's other inputs, static ones [B, ...] and an encoder's sequences [S, B, ...] with
    their `lengths` [B]). greedy: the likeliest token; sample: from the distribution at
    `temperature`, among the `top_k` likeliest if given; beam: the `width` best
    continuations by total log-probability, finished ones ranked by it over length ** alpha.
    A sequence stops after its `end` token."""
    if method not in METHODS:
        raise RnncError(f"unknown decoding method '{method}' (one of {', '.join(METHODS)})", code="E544")
    prime = np.asarray(prime, dtype=np.int64)
    if prime.ndim != 2 or prime.shape[1] < 1:
        raise RnncError("prime must be [batch, length >= 1] token ids", code="E544")
    step = Stepper(m, params, static, lengths)
    if prime.min() < 0 or prime.max() >= step.V:
        raise RnncError(f"prime tokens must lie in 0..{step.V - 1}", code="E544")
    if method == "beam":
        out = [beam(step.row(i), steps, row, width, end, alpha) for i, row in enumerate(prime)]
        return Decoded([t for t, _ in out], [s for _, s in out])
    rng = np.random.default_rng(seed)
    B = prime.shape[0]
    tokens: list[list[int]] = [[] for _ in range(B)]
    scores, done, probs = np.zeros(B), np.zeros(B, bool), []
    p = step(prime.T)
    for _ in range(steps):
        probs.append(p)
        nxt = np.array([pick(p[b], method, temperature, top_k, rng) for b in range(B)])
        for b in np.flatnonzero(~done):
            tokens[b].append(int(nxt[b]))
            scores[b] += np.log(p[b, nxt[b]])
        done |= (nxt == end) if end is not None else False
        if done.all():
            break
        p = step(nxt[None])
    return Decoded(tokens, scores.tolist(), probs)


def pick(p: np.ndarray, method: str, temperature: float, top_k: int | None, rng) -> int:
    if method == "greedy":
        return int(np.argmax(p))
    logits = np.log(np.maximum(p, 1e-30)) / temperature
    if top_k is not None and top_k < len(p):
        logits[np.argsort(logits)[: len(p) - top_k]] = -np.inf  # all but the k likeliest
    q = np.exp(logits - logits.max())
    return int(rng.choice(len(p), p=q / q.sum()))


def beam(step: Stepper, steps: int, prime: np.ndarray, width: int, end: int | None,
         alpha: float) -> tuple[list[int], float]:  # fmt: skip
    """Beam search for one sequence (`step` runs it alone, from its start): its best
    continuation and total log-probability."""
    logp = np.log(np.maximum(step(prime[:, None]), 1e-300))  # [1, V]
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    rank = lambda t, s: s / max(len(t), 1) ** alpha  # noqa: E731
    for _ in range(steps):
        total = np.array([s for _, s in beams])[:, None] + logp  # [live, V]
        order = np.argsort(-total, axis=None, kind="stable")[: 2 * width]
        live, rows = [], []
        for flat in order:
            b, tok = divmod(int(flat), total.shape[1])
            cand = (beams[b][0] + [tok], float(total[b, tok]))
            if end is not None and tok == end:
                finished.append(cand)
            elif len(live) < width:
                live.append(cand)
                rows.append(b)
        beams = live  # (the shorter ones of the step before are extended or dropped)
        if len(finished) >= width and (not live or max(rank(*f) for f in finished) >= max(rank(*c) for c in live)):
            break
        if not live:
            break
        step.keep(np.array(rows))
        logp = np.log(np.maximum(step(np.array([[t[-1] for t, _ in beams]])), 1e-300))
    best = max(finished + beams, key=lambda c: rank(*c))
    return best
