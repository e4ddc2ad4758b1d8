"""rnnc.decode: step-by-step decoding equals the full forward pass on the decoded prefix;
greedy, sampling, top-k and beam search against exhaustive search; static inputs
(captioning); the command line's --decode."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from helpers import rel

from rnnc.compiler import compile_spec
from rnnc.decode import decode
from rnnc.errors import RnncError

ROOT = os.path.join(os.path.dirname(__file__), "..")
LM = os.path.join(ROOT, "specs", "generator.rnn")
CAPTION = """model caption {
  dim V = 5, H = 6, F = 3
  input x[V] : sequence
  input img[F] : static
  target y : sequence of class(V)
  param U[H, V], W[H, H], P[H, F], b[H], Wo[V, H], c[V]
  s = tanh(U @ x + W @ s[t-1] + first(P @ img) + b)
  o = softmax(Wo @ s + c)
  loss = cross_entropy(o, y)
  generate x = onehot(sample(o[t-1]))
}
"""


def model(spec, dims=None, seed=0):
    m = compile_spec(spec, dims=dims)
    rng = np.random.default_rng(seed)
    return m, {k: rng.normal(size=v.shape) for k, v in m.init_params(0, np.float64).items()}


def full_pass(m, params, tokens, V, static=None):
    """The distribution at every step of the full forward pass over these inputs [T, B]."""
    return m.forward(params, {"x": np.eye(V)[tokens], **(static or {})})["o"]


@pytest.mark.parametrize("spec", ["lm", "caption"])
def test_step_by_step_equals_the_full_forward_pass_on_the_prefix(spec):
    m, p = model(LM, {"V": 4, "H": 5}) if spec == "lm" else model(CAPTION)
    V = m.inputs["x"][0][0]
    static = {"img": np.random.default_rng(1).normal(size=(2, 3))} if spec == "caption" else None
    prime = np.array([[1, 2, 3], [0, 3, 3]])
    out = decode(m, p, 8, prime, static=static, method="greedy")
    tokens = np.concatenate([prime, np.array(out.tokens)], axis=1)  # [B, 3 + 8]
    o = full_pass(m, p, tokens[:, :-1].T, V, static)  # the distribution after each input
    assert rel(np.array(out.probs), o[2:]) < 1e-12
    assert (np.argmax(o[2:], axis=-1) == np.array(out.tokens).T).all()
    want = np.log(np.take_along_axis(o[2:], np.array(out.tokens).T[..., None], -1)[..., 0]).sum(0)
    assert rel(np.array(out.scores), want) < 1e-12


def exhaustive(m, p, prime, L, V):
    """The likeliest L tokens after the prime, by the full forward pass of every sequence."""
    best, best_lp = None, -np.inf
    for seq in itertools.product(range(V), repeat=L):
        tokens = np.array([*prime, *seq])
        o = full_pass(m, p, tokens[:-1, None], V)[len(prime) - 1 :, 0]
        lp = np.log(o[np.arange(L), seq]).sum()
        if lp > best_lp:
            best, best_lp = list(seq), lp
    return best, best_lp


@pytest.mark.parametrize("seed", range(4))
def test_beam_search_finds_what_exhaustive_search_finds(seed):
    m, p = model(LM, {"V": 4, "H": 5}, seed=seed)
    for prime in ([1], [2, 0, 3]):
        best, lp = exhaustive(m, p, prime, 3, 4)
        wide = decode(m, p, 3, [prime], method="beam", width=16)  # 4^2: no prefix is pruned
        assert wide.tokens[0] == best and abs(wide.scores[0] - lp) < 1e-12
        narrow = decode(m, p, 3, [prime], method="beam", width=1)
        assert narrow.tokens == decode(m, p, 3, [prime], method="greedy").tokens


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_beam_search_with_an_end_token_ranks_as_exhaustive_search_does(alpha):
    """Texts that end (with token 0) within 4 steps, or are cut at 4, ranked by total
    log-probability / length ** alpha: a beam wide enough to prune nothing finds the best."""
    m, p = model(LM, {"V": 4, "H": 5}, seed=12)  # alpha 0: [0]; alpha 1: [3, 3, 3, 3]
    ranked = []
    for L in range(1, 5):
        for seq in itertools.product(range(4), repeat=L):
            if 0 in seq[:-1] or (seq[-1] != 0 and L < 4):
                continue  # ended earlier, or neither ended nor cut
            o = full_pass(m, p, np.array([2, *seq[:-1]])[:, None], 4)[:, 0]
            lp = np.log(o[np.arange(L), seq]).sum()
            ranked.append((lp / L**alpha, list(seq), lp))
    _, best, lp = max(ranked)
    out = decode(m, p, 4, [[2]], method="beam", width=64, end=0, alpha=alpha)
    assert out.tokens[0] == best and abs(out.scores[0] - lp) < 1e-12


def test_an_end_token_stops_a_sequence_and_beam_search_ranks_finished_ones():
    m, p = model(LM, {"V": 4, "H": 5}, seed=5)
    free = decode(m, p, 12, [[1], [2]], method="greedy").tokens
    end = free[0][3]  # a token the first sequence emits at its 4th step
    out = decode(m, p, 12, [[1], [2]], method="greedy", end=end)
    for toks, whole in zip(out.tokens, free, strict=True):
        cut = whole.index(end) + 1 if end in whole else len(whole)
        assert toks == whole[:cut]  # up to and with its first end token, nothing after
    assert len(out.tokens[0]) <= 4
    both = decode(m, p, 12, [[1], [1]], method="greedy", end=end)
    assert len(both.probs) == len(both.tokens[0])  # all ended: no step after the last
    beam = decode(m, p, 30, [[1]], method="beam", width=3, end=0)
    toks, score = beam.tokens[0], beam.scores[0]
    assert toks[-1] == 0 and 0 not in toks[:-1]
    o = full_pass(m, p, np.array([1, *toks[:-1]])[:, None], 4)[:, 0]
    assert abs(score - np.log(o[np.arange(len(toks)), toks]).sum()) < 1e-12


def test_beam_search_reads_each_sequences_own_static_inputs():
    m, p = model(CAPTION, seed=2)
    img = np.random.default_rng(5).normal(size=(2, 3)) * 3  # two images, two captions
    prime = [[1], [1]]
    greedy = decode(m, p, 6, prime, static={"img": img}, method="greedy")
    beam = decode(m, p, 6, prime, static={"img": img}, method="beam", width=1)
    assert beam.tokens == greedy.tokens and greedy.tokens[0] != greedy.tokens[1]
    assert rel(np.array(beam.scores), np.array(greedy.scores)) < 1e-12


def test_sampling_top_k_and_temperature():
    m, p = model(LM, {"V": 4, "H": 5}, seed=7)
    prime = [[1, 2]] * 3
    greedy = decode(m, p, 10, prime, method="greedy").tokens
    assert decode(m, p, 10, prime, method="sample", top_k=1, seed=4).tokens == greedy
    a = decode(m, p, 10, prime, method="sample", seed=4).tokens
    assert a == decode(m, p, 10, prime, method="sample", seed=4).tokens  # seeded: the same draws
    assert a != decode(m, p, 10, prime, method="sample", seed=5).tokens
    cold = decode(m, p, 10, prime, method="sample", temperature=1e-3, seed=4).tokens
    assert cold == greedy  # temperature -> 0 is greedy
    top2 = decode(m, p, 40, [[1, 2]] * 20, method="sample", top_k=2, seed=1)
    for probs, toks in zip(np.array(top2.probs), np.array(top2.tokens).T, strict=False):
        ranks = (-probs).argsort(axis=-1).argsort(axis=-1)  # 0: the likeliest
        assert (ranks[np.arange(len(toks)), toks] < 2).all()


def test_decoding_errors_are_worded():
    m, p = model(LM, {"V": 4, "H": 5})
    with pytest.raises(RnncError, match="unknown decoding method 'nucleus'") as e:
        decode(m, p, 3, [[1]], method="nucleus")
    assert e.value.code == "E544"
    with pytest.raises(RnncError, match=r"prime tokens must lie in 0\.\.3"):
        decode(m, p, 3, [[4]])
    with pytest.raises(RnncError, match=r"prime must be \[batch, length >= 1\]"):
        decode(m, p, 3, [1, 2])
    no_rule, q = model(os.path.join(ROOT, "specs", "elman.rnn"), {"H": 4})
    with pytest.raises(RnncError, match=r"exactly one `generate x = \.\.\.` rule"):
        decode(no_rule, q, 3, [[1]])


def test_beam_search_stops_once_finished_texts_outrank_the_live_ones(monkeypatch):
    """With `width` texts ended and the best of them ranked above every live one (log-
    probabilities only fall as tokens are added: exact at alpha 0), the search stops early."""
    m, p = model(LM, {"V": 4, "H": 5}, seed=5)
    end = int(np.argmax(decode(m, p, 1, [[1]], method="greedy").probs[0][0]))  # the likeliest next
    calls = []
    forward = m.forward
    monkeypatch.setattr(m, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    out = decode(m, p, 50, [[1]], method="beam", width=2, end=end)
    assert len(calls) < 50 and out.tokens[0][-1] == end
    toks = out.tokens[0]
    o = full_pass(m, p, np.array([1, *toks[:-1]])[:, None], 4)[:, 0]
    assert abs(out.scores[0] - np.log(o[np.arange(len(toks)), toks]).sum()) < 1e-12


@pytest.mark.parametrize("spec", ["attention_additive", "attention_dot", "encoder_decoder"])
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_an_encoder_decoder_decodes_step_by_step_as_the_full_pass(spec, method):
    """Encoder-decoders with attention: the source (with its own lengths) comes with every
    step, only the decoder's state is carried; each step's distribution equals the full
    forward pass's on the decoded prefix, and beam search with a width that prunes nothing
    finds the exhaustive best."""
    m, p = model(os.path.join(ROOT, "specs", f"{spec}.rnn"), {"S": 3, "V": 3, "H": 4, "A": 2}
                 if "additive" in spec else {"S": 3, "V": 3, "H": 4})  # fmt: skip
    rng = np.random.default_rng(2)
    src, L = rng.normal(size=(5, 2, 3)), {"src": np.array([5, 2])}
    prime = np.array([[1], [2]])

    def full(tokens, rows=slice(None)):
        x = {"tgt_in": np.eye(3)[tokens], "src": src[:, rows]}
        return m.forward(p, x, lengths={"src": L["src"][rows], "tgt_in": np.full(tokens.shape[1], len(tokens))})["p"]

    if method == "greedy":
        out = decode(m, p, 4, prime, static={"src": src}, lengths=L, method="greedy")
        tokens = np.concatenate([prime, np.array(out.tokens)], axis=1)
        o = full(tokens[:, :-1].T)
        assert rel(np.array(out.probs), o) < 1e-12
        assert (np.argmax(o, axis=-1) == np.array(out.tokens).T).all()
        return
    for b in range(2):
        best, best_lp = None, -np.inf
        for seq in itertools.product(range(3), repeat=3):
            tokens = np.array([prime[b, 0], *seq])
            o = full(tokens[:-1, None], slice(b, b + 1))[:, 0]
            lp = np.log(o[np.arange(3), seq]).sum()
            if lp > best_lp:
                best, best_lp = list(seq), lp
        got = decode(m, p, 3, prime[b : b + 1], static={"src": src[:, b : b + 1]}, lengths={"src": L["src"][b : b + 1]},
                     method="beam", width=9)  # fmt: skip
        assert got.tokens[0] == best and abs(got.scores[0] - best_lp) < 1e-12


class Scripted:
    """A stepper whose next-token distribution depends on the last token only: after 0 (the
    prime) it is almost surely 1, after 1 almost surely the end token 2."""

    def __call__(self, tokens):
        table = {0: [0.01, 0.98, 0.01], 1: [0.004, 0.006, 0.99], 2: [1 / 3] * 3}
        return np.array([table[int(t)] for t in tokens[-1]])

    def keep(self, rows):
        pass


def test_beam_search_never_returns_a_prefix_of_a_finished_sequence():
    """When every live beam ends at once, the answer is the best finished sequence (with its
    end token), not the unextended prefix of the step before (whose score is higher only
    because it lacks the end token's log-probability)."""
    from rnnc.decode import beam

    tokens, score = beam(Scripted(), 5, np.array([0]), width=2, end=2, alpha=0.0)
    assert tokens == [1, 2] and abs(score - np.log(0.98 * 0.99)) < 1e-12


@pytest.mark.parametrize("kind", ["encoder-decoder", "captioning"])
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_the_command_line_decodes_token_models_as_the_python_api(tmp_path, capsys, kind, method):
    """`rnnc run --generate N --params P --data D --prime IDS`: the other inputs (an encoder's
    source with its lengths, an image's features) come from --data; one line per sequence."""
    from rnnc.cli import main
    from rnnc.files import save_arrays

    rng = np.random.default_rng(3)
    if kind == "captioning":
        spec, dims = tmp_path / "c.rnn", []
        spec.write_text(CAPTION)
        given, lengths = {"img": rng.normal(size=(3, 3))}, None
    else:
        spec, dims = os.path.join(ROOT, "specs", "attention_additive.rnn"), ["S=4", "V=5", "H=6", "A=3"]
        given, lengths = {"src": rng.normal(size=(5, 3, 4))}, {"src": np.array([5, 2, 3])}
    flags = [f for d in dims for f in ("--dim", d)]
    m, p = model(str(spec), {k: int(v) for k, v in (d.split("=") for d in dims)} or None)
    save_arrays(str(tmp_path / "p.npz"), p)
    save_arrays(str(tmp_path / "d.npz"), {**given, **({"src.lengths": lengths["src"]} if lengths else {})})
    want = decode(m, p, 4, [[1, 2]] * 3, static=given, lengths=lengths, method=method, width=3, end=4)
    code = main(["run", str(spec), *flags, "--params", str(tmp_path / "p.npz"), "--data", str(tmp_path / "d.npz"),
                 "--generate", "4", "--prime", "1,2", "--decode", method, "--beam-width", "3", "--end", "4"])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split("  (")[0] for line in out] == [f"{b}: {' '.join(map(str, t))}" for b, t in enumerate(want.tokens)]
    assert all(f"(log-probability {s:.6g})" in line for line, s in zip(out, want.scores, strict=True))


def test_the_command_line_says_what_token_decoding_needs(tmp_path, capsys):
    from rnnc.cli import main
    from rnnc.files import save_arrays

    spec = os.path.join(ROOT, "specs", "attention_additive.rnn")
    _, p = model(spec)
    save_arrays(str(tmp_path / "p.npz"), p)
    base = ["run", spec, "--params", str(tmp_path / "p.npz"), "--generate", "3"]
    assert main([*base, "--prime", "1"]) == 2
    assert "the model's other inputs (src) come in --data FILE.npz" in capsys.readouterr().err
    assert main([*base, "--prime", "x"]) == 2
    assert "--prime and --end take token ids for this model (0..23)" in capsys.readouterr().err
    assert main(base) == 2
    assert "decoding 'tgt_in' needs --prime" in capsys.readouterr().err
    save_arrays(str(tmp_path / "d.npz"), {"src": np.zeros((3, 1, 20))})
    assert main([*base, "--prime", "1", "--end", "24", "--data", str(tmp_path / "d.npz")]) == 1
    assert "the end token 24 is not one of the model's tokens 0..23" in capsys.readouterr().err


def test_an_encoder_runs_once_per_decode_and_the_step_has_no_encoder_loop():
    """decode() cuts the model where the decoder reads the encoder: the encoder's states (for
    attention) and final state are computed once for the batch; each step runs the decoder
    alone, reading them as inputs."""
    from rnnc.decode import split

    spec = os.path.join(ROOT, "specs", "attention_dot.rnn")
    m, p = model(spec, {"S": 3, "V": 3, "H": 4})
    parts = split(m, "tgt_in")
    assert parts.cut == {"e.h[s]": "src", "last(e.c)": "static", "last(e.h)": "static"}
    assert "range(T_src)" not in parts.step.source and "range(T_tgt_in)" in parts.step.source
    m._split = parts
    calls = []
    forward = parts.encoder.forward
    parts.encoder.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    src = np.random.default_rng(0).normal(size=(5, 2, 3))
    for method in ("greedy", "beam"):
        calls.clear()
        decode(m, p, 4, [[1], [2]], static={"src": src}, lengths={"src": np.array([5, 3])}, method=method, width=2)
        assert len(calls) == 1, method


def test_attention_keys_are_made_once_per_batch_not_per_decoding_step():
    """The additive model's keys = Wa @ e[s] depend on the encoder only: they cross into the
    decoder-only module as a value per step s, so no decoding step multiplies by Wa."""
    from rnnc.decode import split

    m, _ = model(os.path.join(ROOT, "specs", "attention_additive.rnn"), {"S": 3, "V": 3, "H": 4, "A": 2})
    parts = split(m, "tgt_in")
    assert parts.cut == {"keys": "src", "e.h[s]": "src"}
    assert "Wa" not in parts.step.params and "Wa" in parts.encoder.params


SELF_ATTENTION_LM = """use GRU

model sa_lm {
  dim V = 4, H = 4
  input x[V] : sequence
  target y : sequence of class(V)
  param Wq[H, H], Wk[H, H], Wo[V, 2 * H], bo[V]
  h = GRU(x, H=H)
  a = softmax(sum((Wq @ h) * (Wk @ h[s])), over=s)
  ctx = sum(a * h[s], over=s)
  o = softmax(Wo @ concat(h, ctx) + bo)
  loss = cross_entropy(o, y)
  generate x = onehot(sample(o[t-1]))
}
"""


def test_a_model_attending_over_its_own_past_decodes_as_the_full_pass():
    """No carried state holds every step so far: a step of a self-attention model reruns the
    whole prefix, so its distribution is still the full pass's, and beam search exhaustive."""
    m, p = model(SELF_ATTENTION_LM)
    prime = np.array([[1, 2, 3], [0, 3, 3]])
    out = decode(m, p, 4, prime, method="greedy")
    tokens = np.concatenate([prime, np.array(out.tokens)], axis=1)
    assert rel(np.array(out.probs), full_pass(m, p, tokens[:, :-1].T, 4)[2:]) < 1e-12
    best, lp = exhaustive(m, p, [2, 0], 3, 4)
    wide = decode(m, p, 3, [[2, 0]], method="beam", width=16)
    assert wide.tokens[0] == best and abs(wide.scores[0] - lp) < 1e-12
