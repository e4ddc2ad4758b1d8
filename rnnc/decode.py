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
reads them at the very first step only, as in training. An encoder-decoder is encoded once:
the model is cut where the decoder reads the encoder, and each step runs the decoder alone."""

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


@dataclass
class Split:
    """A model cut where its decoder reads the rest: `encoder` computes, once per batch, the
    values the decoder reads (an encoder's states for attention, its final state), named
    `cut`; `step` is the decoder alone, reading them as inputs (it recomputes only the
    loop-invariant work on them, such as attention's keys: no encoder loop)."""

    encoder: Model
    step: Model
    cut: dict[str, str]  # the step model's input name -> its domain ('static' or a domain)


def split(m: Model, x: str) -> Split:
    """Cut m between what depends on its generated input x's time domain and what does not."""
    import networkx as nx

    from .compiler import forward_model
    from .graph import add_node, copy_graph, forward_outputs
    from .ops import GLOBAL, OPS, STATIC

    g = m.graph
    clock = g.nodes[g.graph["inputs"][x]]["level"]
    decoder = set().union(*({n} | nx.descendants(g, n) for n, d in g.nodes(data=True) if d["level"] == clock))
    cut = {u for u in g if u not in decoder and OPS[g.nodes[u]["op"]].kind != "leaf"
           and g.nodes[u]["level"] != GLOBAL  # (weights packed from params: the step's own)
           and any(v in decoder for v in g.successors(u))}  # fmt: skip
    names = {u: cut_name(g, u) for u in cut}
    encoder = forward_model(m.program, g, {names[u]: u for u in cut}, m.target, "encoder")
    h = copy_graph(g)
    given: dict[str, int] = {}
    for u in cut:  # each cut value becomes an input of the step model
        d = g.nodes[u]
        dom = d["pair"] or d["level"]  # a value per step s of e ([S, B, ...]) comes in as e does
        given[names[u]] = reader = add_node(h, "input", (), names[u], d["span"], name=names[u], dom=dom)
        h.nodes[reader].update(shape=d["shape"], level=dom, classes=d["classes"])
        if d["pair"]:  # ... and is read as every step s again (the attention keys, made once)
            reader = add_node(h, "every", [(reader, 0)], None, d["span"], over=dom)
            h.nodes[reader].update(shape=d["shape"], level=STATIC, pair=dom)
        for _, v, key, e in list(h.out_edges(u, keys=True, data=True)):
            h.add_edge(reader, v, **e)
            h.remove_edge(u, v, key)
    wanted = {k: n for k, n in forward_outputs(h).items() if n in decoder}
    keep = set().union(*({n} | nx.ancestors(h, n) for n in wanted.values()))
    h.remove_nodes_from([n for n in list(h) if n not in keep])
    h.graph.update(loss=None, targets={}, outputs=wanted)
    for kind in ("inputs", "params", "masks"):
        h.graph[kind] = {k: n for k, n in {**h.graph.get(kind, {}), **(given if kind == "inputs" else {})}.items()
                         if n in h}  # fmt: skip
    h.graph["domains"] = {  # each domain with the inputs left to carry its length
        dm: {**info, "inputs": [k for k, n in h.graph["inputs"].items() if h.nodes[n]["level"] == dm]}
        for dm, info in g.graph["domains"].items()
        if any(h.nodes[n]["level"] == dm for n in h.graph["inputs"].values())
    }
    step = forward_model(m.program, h, wanted, m.target, "step")
    return Split(encoder, step, {names[u]: g.nodes[u]["pair"] or g.nodes[u]["level"] for u in cut})


def cut_name(g, u: int) -> str:
    """The name a value the decoder reads goes by: its own, or e.h[s], last(e.c), ..."""
    from .graph import label

    d = g.nodes[u]
    if d["name"]:
        return d["name"]
    x = label(g, next(g.predecessors(u)))
    return f"{x}[s]" if d["op"] == "every" else f"{d['op']}({x})"


class Stepper:
    """The model one step (or one prime) at a time, its state carried between calls. The
    other inputs (`given`) come with every call: static ones ([B, ...], an image's features)
    and sequences of other clocks ([S, B, ...], an encoder's source, with their `lengths`);
    with the latter the model is split (`split`): the encoder runs once, at the start, and
    each call runs the decoder alone on the encoder's values, carrying the decoder's state."""

    def __init__(self, m: Model, params: dict, given: dict | None, lengths: dict | None = None):
        self.m, self.params = m, params
        self.x, self.o, self.V = generate_rule(m)
        self.given = {k: np.asarray(v) for k, v in (given or {}).items()}
        self.lengths = {k: np.asarray(v) for k, v in (lengths or {}).items()}
        dom = m.inputs[self.x][1]
        self.own = {d["name"] for _, d in m.graph.nodes(data=True) if d["name"] and d["level"] == dom}
        self.carry: dict | None = None
        # attention over the generated sequence's own steps (h[s]) needs every step so far,
        # which no carried state holds: such a model reruns the whole prefix each step
        self.rerun = any(d["pair"] == dom for _, d in m.graph.nodes(data=True))
        self.prefix: np.ndarray | None = None  # (with rerun: the tokens so far)
        self.model = m
        if any(m.inputs[k][1] != "static" for k in self.given):  # an encoder: run it once
            self.encode()
        self.seqs = {k for k in self.given if self.model.inputs[k][1] != "static"}

    def encode(self) -> None:
        """The encoder once for the whole batch; each step then runs the decoder alone."""
        parts = getattr(self.m, "_split", None)
        if parts is None:
            parts = self.m._split = split(self.m, self.x)
        B = next(v.shape[1] if self.m.inputs[k][1] != "static" else v.shape[0] for k, v in self.given.items())
        dummy = {self.x: np.zeros((1, B, self.V))}  # (the encoder reads no target token)
        enc = parts.encoder.forward(self.params, {**self.given, **dummy}, lengths=self.lengths or None)
        self.given = {k: v for k, v in {**self.given, **enc}.items() if k in parts.step.inputs}
        doms = {lv for _, lv, _ in parts.step.inputs.values()}  # (only its final state: no source)
        self.lengths = {k: v for k, v in self.lengths.items() if k in doms}
        self.model = parts.step

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [T, B] -> the distribution after the last of them, [B, V] (float64)."""
        if self.rerun:  # the whole prefix, from the start
            tokens = self.prefix = tokens if self.prefix is None else np.concatenate([self.prefix, tokens])
        x = np.eye(self.V)[tokens]
        out, carry = self.model.forward(self.params, {self.x: x, **self.given}, lengths=self.lengths or None,
                                        carry=self.carry, return_carry=True)  # fmt: skip
        if not self.rerun:
            self.carry = {k: v for k, v in carry.items() if k in self.own}
        return np.asarray(on_host(out[self.o][-1]), np.float64)

    def keep(self, rows: np.ndarray) -> None:
        """Keep (and repeat) these batch rows of the state and of the other inputs."""
        self.carry = None if self.carry is None else {k: v[:, rows] for k, v in self.carry.items()}
        if self.prefix is not None:
            self.prefix = self.prefix[:, rows]
        self.given = {k: v[:, rows] if k in self.seqs else v[rows] for k, v in self.given.items()}
        self.lengths = {k: v[rows] for k, v in self.lengths.items()}

    def row(self, i: int) -> Stepper:
        """A stepper for sequence i alone, from its start."""
        one = copy.copy(self)
        one.carry = None
        one.prefix = None
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
    if end is not None and not 0 <= end < step.V:
        raise RnncError(f"the end token {end} is not one of the model's tokens 0..{step.V - 1}", code="E544")
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
