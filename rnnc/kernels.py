"""NumPy helpers that op templates call; their source is copied into generated modules.

Layout: a sequence is [T, B, *features], a per-sequence value [B, *features], a parameter
[*features]. `M` is a [T, B] bool mask of valid steps, or None when every step is valid.
Each helper works for any leading axes so the interpreter can call it one step at a time.
"""

import numpy as np


def sigmoid(x):
    # 0.5 * (1 + tanh(x / 2)): one SIMD tanh, no overflow; but it loses relative accuracy
    # for x < 0 and is exactly 0 below -17.3 in float32, so there e^x / (1 + e^x) instead
    y = 0.5 * (1.0 + np.tanh(0.5 * x))
    low = x < -8.0
    if low.any():  # saturated entries only: the exact form costs ~5x the tanh form
        e = np.exp(np.minimum(x, 0.0))
        y = np.where(low, e / (1.0 + e), y)
    return y


def log_sigmoid(x):
    # log σ(x) = -softplus(-x), exact for any x
    return -np.logaddexp(0, -x)


def ce_sigmoid(z, y):
    # -log σ(z[y]): cross-entropy of a sigmoid read at the label, fused like softmax's
    zy = np.take_along_axis(along(z, y), y[..., None], axis=-1)[..., 0]
    return np.logaddexp(0, -zy)


def ce_sigmoid_d(z, y):
    # σ(z[y]) - 1 at the label, 0 elsewhere
    z = along(z, y)
    d = np.zeros(z.shape, z.dtype)
    flat = d.reshape(-1, z.shape[-1])
    rows, cols = np.arange(flat.shape[0]), y.reshape(-1)
    flat[rows, cols] = sigmoid(z.reshape(-1, z.shape[-1])[rows, cols]) - 1
    return d


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):
    s = x - x.max(axis=-1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def valid_s(x, M, r, upto):
    # which steps s of an attended sequence count, shaped to broadcast against x ([S, B, ...] at
    # a step t, [T, S, B, ...] over the whole sequence; r trailing feature axes): within its
    # length (M: [S, B], None when every step is valid) and, for a sequence's own steps, s <= t
    ax = x.ndim - r - 2
    S = x.shape[ax]
    keep = None if M is None else np.asarray(M)[:S]
    if upto is not None:
        s = np.arange(S)
        c = (np.arange(x.shape[0])[:, None] >= s)[:, :, None] if upto == "all" else (s <= upto)[:, None]
        keep = c if keep is None else c & keep
    return None if keep is None else keep.reshape(keep.shape + (1,) * r)


def softmax_s(x, M, r, upto=None):
    # softmax over the steps s; steps that do not count weigh exactly 0, a row with none is 0
    ax = x.ndim - r - 2
    keep = valid_s(x, M, r, upto)
    z = x if keep is None else np.where(keep, x, -np.inf)
    top = z.max(axis=ax, keepdims=True)
    e = np.exp(z - np.where(np.isfinite(top), top, 0))
    total = e.sum(axis=ax, keepdims=True)
    return e / np.where(total > 0, total, 1)


def sum_s(x, M, r, upto=None):
    keep = valid_s(x, M, r, upto)
    return (x if keep is None else np.where(keep, x, 0)).sum(axis=x.ndim - r - 2)


def bcast_s(g, S, M, r, upto=None):
    # the adjoint of sum_s: g copied to each of the S steps s that count ([B, ...] -> [S, B, ...]
    # at a step; [T, B, ...] -> [T, S, B, ...] over the whole sequence)
    out = np.repeat(np.expand_dims(g, g.ndim - r - 1), S, axis=g.ndim - r - 1)
    keep = valid_s(out, M, r, upto)
    return out if keep is None else np.where(keep, out, 0)


def step(x):
    return (x > 0).astype(x.dtype)


def expand(s, n):
    # a per-feature copy of a scalar: the adjoint of a reduction over the features (a scalar
    # per step or per sequence comes with its trailing axis already; a model-wide one is 0-d)
    s = np.asarray(s)
    return np.repeat(s[..., None] if s.ndim == 0 else s, n, axis=-1)


def max_mask(x):
    # one-hot of the first largest feature, where the gradient of max goes (flat view: CuPy
    # has no put_along_axis)
    m = np.zeros_like(x)
    flat = m.reshape(-1, m.shape[-1])
    flat[np.arange(flat.shape[0]), x.reshape(-1, x.shape[-1]).argmax(axis=-1)] = 1
    return m


def min_mask(x):
    return max_mask(-x)


def layernorm(x, eps):
    # (x - mean) / sqrt(var + eps) over the features; the variance in two passes (stable)
    c = x - x.mean(axis=-1, keepdims=True)
    return c / np.sqrt((c * c).mean(axis=-1, keepdims=True) + eps)


def layernorm_d(g, y, x, eps):
    # the adjoint of y = layernorm(x): (g - mean(g) - y * mean(g * y)) / sqrt(var + eps)
    c = x - x.mean(axis=-1, keepdims=True)
    r = 1 / np.sqrt((c * c).mean(axis=-1, keepdims=True) + eps)
    return r * (g - g.mean(axis=-1, keepdims=True) - y * (g * y).mean(axis=-1, keepdims=True))


def rmsnorm(x, eps):
    # x / sqrt(mean(x^2) + eps) over the features
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def rmsnorm_d(g, y, x, eps):
    # the adjoint of y = rmsnorm(x): (g - y * mean(g * y)) / sqrt(mean(x^2) + eps)
    r = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return r * (g - y * (g * y).mean(axis=-1, keepdims=True))


def elu(x, alpha):
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


def linear(x, W):
    # x @ W.T over a whole sequence as one 2-D GEMM (a 3-D matmul runs about 2x slower)
    return (x.reshape(-1, x.shape[-1]) @ W.T).reshape(x.shape[:-1] + (W.shape[0],))


def linear_t(g, W):
    return (g.reshape(-1, g.shape[-1]) @ W).reshape(g.shape[:-1] + (W.shape[1],))


def outer(g, x):
    # sum over every leading (time, batch) axis of g ⊗ x: one GEMM
    return g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def reduce_to(a, keep):
    # sum the leading axes so that `keep` trailing axes remain
    return a.sum(axis=tuple(range(a.ndim - keep))) if a.ndim > keep else a


def pad(g, start, n, axis):
    shape = list(g.shape)
    shape[axis] = n
    out = np.zeros(shape, g.dtype)
    index = [slice(None)] * g.ndim
    index[axis] = slice(start, start + g.shape[axis])
    out[tuple(index)] = g
    return out


def along(z, y):
    # z as [..., K] over y's leading axes: a per-sequence z read by per-step labels repeats
    return z if z.ndim == y.ndim + 1 else np.broadcast_to(z, y.shape + z.shape[-1:])


def ce_logits(z, y):
    # cross-entropy from logits, max-shifted log-sum-exp: no log(0), no overflow
    z = along(z, y)
    m = z.max(axis=-1)
    lse = m + np.log(np.exp(z - m[..., None]).sum(axis=-1))
    return lse - np.take_along_axis(z, y[..., None], axis=-1)[..., 0]


def ce_logits_d(z, y):
    # softmax minus one-hot, written through a flat view (CuPy 13 has no put_along_axis)
    d = np.ascontiguousarray(softmax(along(z, y)))
    flat = d.reshape(-1, d.shape[-1])
    flat[np.arange(flat.shape[0]), y.reshape(-1)] -= 1
    return d


def ce_probs(p, y):
    q = np.take_along_axis(along(p, y), y[..., None], axis=-1)[..., 0]
    return -np.log(np.maximum(q, np.finfo(p.dtype).tiny))


def ce_probs_d(p, y):
    # -1/q at the label; 0 where q is clamped to the smallest float (the loss is flat there)
    p = along(p, y)
    d = np.zeros(p.shape, p.dtype)
    flat = d.reshape(-1, p.shape[-1])
    rows, cols = np.arange(flat.shape[0]), y.reshape(-1)
    q = p.reshape(-1, p.shape[-1])[rows, cols]
    tiny = np.finfo(p.dtype).tiny
    flat[rows, cols] = np.where(q > tiny, -1 / np.maximum(q, tiny), 0)
    return d


def onehot(i, n, dtype):
    return (i[..., None] == np.arange(n)).astype(dtype)


def loss_weights(shape, M, mode, window=None):
    # the weight of each per-step, per-sequence loss in the total: 1/B, or 1/(B*L) for mean
    # (in a window of a longer sequence, L is the whole sequence's length: window["steps"])
    if M is None and (mode == "sum" or len(shape) == 1):
        return 1.0 / shape[-1]  # the same for all: a number, not an array
    w = np.full(shape, 1.0 / shape[-1])
    if len(shape) == 2:
        if M is not None:
            w = w * M
        if mode == "mean":
            steps = M.sum(axis=0) if M is not None else np.full(shape[-1], shape[0])
            if window is not None:
                steps = np.asarray(window["steps"])
            w = w / np.maximum(steps, 1)
    return w


def loss_reduce(l, M, mode, window=None):
    return (l * loss_weights(l.shape, M, mode, window)).sum().astype(l.dtype)


def loss_spread(g, l, M, mode, window=None):
    return np.broadcast_to(np.asarray(g * loss_weights(l.shape, M, mode, window), l.dtype), l.shape)


def loss_step(l, M, T, t, mode):
    # one step's share of loss_reduce, for the unrolled reference
    w = np.broadcast_to(loss_weights((T, *l.shape), M, mode), (T, *l.shape))[t]
    return (l * w).sum().astype(l.dtype)


def loss_step_d(g, l, M, T, t, mode):
    w = np.broadcast_to(loss_weights((T, *l.shape), M, mode), (T, *l.shape))[t]
    return (g * w).astype(l.dtype)


def last_step(h, M):
    if M is None:
        return h[-1]
    return h[M.sum(axis=0) - 1, np.arange(h.shape[1])]


def on_last(g, h, M):
    out = np.zeros_like(h)
    if M is None:
        out[-1] = g
    else:
        out[M.sum(axis=0) - 1, np.arange(h.shape[1])] = g
    return out


def on_first(g, h):
    out = np.zeros_like(h)
    out[0] = g
    return out


def on_first_T(v, T, carried=False):
    # v at step 0 only; a window that continues a sequence (a carry came in) has no step 0
    out = np.zeros((T, *v.shape), v.dtype)
    if not carried:
        out[0] = v
    return out


def pairs(h):
    n = h.shape[0] // 2 * 2
    return np.concatenate((h[0:n:2], h[1:n:2]), axis=-1)


def unpairs(g, h):
    out = np.zeros_like(h)
    k = h.shape[-1]
    n = g.shape[0] * 2
    out[0:n:2] = g[..., :k]
    out[1:n:2] = g[..., k:]
    return out


def pairs_mask(M):
    return None if M is None else M[1 : M.shape[0] // 2 * 2 : 2]


def valid_pair(M, t, s):
    # both the reading step t and the read step s are inside each sequence: [B] bool
    T = M.shape[0]
    if not 0 <= s < T:
        return np.zeros(M.shape[1], bool)
    return M[t] & M[s]


def valid_shift(M, k, window=None):
    # valid_pair for every t at once: [T, B] bool; in a window of a longer sequence the last
    # step's read of t + 1 falls in the next window, valid where the sequence goes on
    T = M.shape[0]
    out = np.zeros_like(M)
    if window is not None and k == -1:
        out[T - 1] = M[T - 1]
    if abs(k) >= T:
        return out  # every read falls outside the sequence
    if k >= 0:
        out[k:] = M[k:] & M[: T - k]
    else:
        out[: T + k] = M[: T + k] & M[-k:]
    return out


def edge_sum(c, k, M, carried=False):
    # the adjoint of an initial state read at delay k: the steps whose read fell outside
    T = c.shape[0]
    if carried and k > 0:
        return np.zeros(c.shape[1:], c.dtype)  # the carried-in state was read instead
    if M is None:
        part = c[:k] if k > 0 else c[max(T + k, 0) :]
        return part.sum(axis=0)
    w = M & ~valid_shift(M, k)
    return (c * w.reshape(w.shape + (1,) * (c.ndim - 2))).sum(axis=0)


def edge_first(c, carried=False):
    # edge_sum at delay 1 of an adjoint kept as a running value: the value of step 0, where
    # every sequence starts (0 when a carried-in state was read instead)
    return np.zeros_like(c) if carried else c


def select_valid(u, fill, M, t, s):
    v = valid_pair(M, t, s)
    return np.where(v.reshape(v.shape + (1,) * (u.ndim - 1)), u, fill)


def where_valid(g, M, t, s, inside):
    v = valid_pair(M, t, s)
    if not inside:
        v = ~v
    return g * v.reshape(v.shape + (1,) * (g.ndim - 1))


def pick_last(hs, M):
    return last_step(np.stack(hs), M)


def at_last(g, M, T, t):
    # g where step t is each sequence's last, else 0 (adjoint of pick_last)
    last = np.full(g.shape[0], T - 1) if M is None else M.sum(axis=0) - 1
    return g * (last == t).reshape((-1,) + (1,) * (g.ndim - 1))


def sample(p, rng, temperature=1.0):
    # draw one class per row from probabilities p, sharpened or flattened by temperature
    # (an equation's sample(o) draws at 1 from the rng the call is given, or a fixed one)
    rng = np.random.default_rng(0) if rng is None else rng
    logits = np.log(np.maximum(p, 1e-30)) / temperature
    q = np.exp(logits - logits.max(axis=-1, keepdims=True))
    q = q / q.sum(axis=-1, keepdims=True)
    u = rng.random((*q.shape[:-1], 1))
    return np.minimum((q.cumsum(axis=-1) < u).sum(axis=-1), q.shape[-1] - 1)


def adjoint_in(window, key, shape, dt):
    # the adjoint of a state this window hands on, from the windows after it (0 without one)
    d = None if window is None else window["dcarry"].get(key)
    return np.zeros(shape, dt) if d is None else np.asarray(d, dt)


def carried_in(carry, key, fill=None):
    # a state carried in from a previous window, else its initial value: a carry may hold some
    # states only (decoding carries the decoder's, the encoder runs from its start)
    return fill if carry is None or key not in carry else carry[key]


def pad_time(a, past, future, fill, carried=None):
    # a [T, ...] with `past` rows of fill (or the carried-in state) before, `future` after
    out = np.empty((past + a.shape[0] + future, *a.shape[1:]), a.dtype)
    out[:past] = fill if carried is None else carried
    out[past : past + a.shape[0]] = a
    out[past + a.shape[0] :] = fill
    return out


def check_data(inputs, inputs_table, targets=None, targets_table=None):
    # every array present, [T, B, *features] or [B, *features] as the table says; one B;
    # one T per time domain, and a pairs() domain ('x/2') half as long as the one it halves
    batch, steps = {}, {}
    for arrays, table, kind in ((inputs, inputs_table, "inputs"), (targets, targets_table, "targets")):
        if table is None:
            continue
        for name, (shape, dom, labels) in table.items():
            if name not in arrays:
                raise KeyError(f"{kind}[{name!r}] is missing; the model's {kind}: "
                               + ", ".join(map(repr, table)))
            have, lead = tuple(np.shape(arrays[name])), (1 if dom == "static" else 2)
            want = ("T", "B")[2 - lead :] + (() if labels else tuple(shape))
            if len(have) != len(want) or have[lead:] != want[lead:]:
                raise ValueError(f"{kind}[{name!r}] has shape {list(have)}; expected "
                                 f"[{', '.join(map(str, want))}] ([time, batch, features] for a "
                                 "sequence, [batch, features] per sequence)")
            batch.setdefault(have[lead - 1], f"{kind}[{name!r}]")
            if lead == 2:
                steps.setdefault(dom, []).append((f"{kind}[{name!r}]", have[0]))
    if len(batch) > 1:
        raise ValueError("the arrays disagree on the batch size: "
                         + ", ".join(f"{who} has {b}" for b, who in batch.items()))
    for dom, seen in steps.items():
        root, halvings = dom.split("/")[0], dom.count("/")
        first, n = steps.get(root, seen)[0]
        for who, m in seen:
            if halvings and root in steps and m != n >> halvings:
                raise ValueError(f"{who} has {m} steps; it runs over pairs of {first}'s "
                                 f"{n} steps{' (halved ' + str(halvings) + ' times)' if halvings > 1 else ''}, "
                                 f"so it needs {n >> halvings}")
            if m != seen[0][1]:
                raise ValueError(f"{who} has {m} steps but {seen[0][0]} has {seen[0][1]}: they "
                                 "run over the same steps and need the same length")


def noise_mask(given, rng, kind, p, shape, dt, name):
    # a dropout mask (0 or 1/(1-p)) or a zoneout mask (1: keep the previous value): given in
    # inputs, drawn from rng (training), or its expectation (evaluation: 1, or p for zoneout)
    if given is not None:
        given = np.asarray(given, dt)
        if given.shape != tuple(shape):
            raise ValueError(f"inputs[{name!r}] (a {kind} mask) has shape {list(given.shape)}; "
                             f"expected {list(shape)}")
        return given
    if rng is None:
        return np.full(shape, 1.0 if kind == "dropout" else p, dt)
    u = rng.random(shape)
    return np.asarray((u >= p) / (1.0 - p) if kind == "dropout" else u < p, dt)


def noise_lead(inputs, table, dom):
    # the leading axes of a mask: (T, B) of its time domain ('x', or 'x/2' for pairs), or (B,)
    for name, (_, d, _) in table.items():
        if d == "static" or d.split("/")[0] != dom.split("/")[0]:
            continue
        T, B = np.shape(inputs[name])[:2]
        return (B,) if dom == "static" else (T >> (dom.count("/") - d.count("/")), B)
    name, (_, d, _) = next(iter(table.items()))
    return (np.shape(inputs[name])[0 if d == "static" else 1],)


def check_lengths(lengths, domains):
    # every key of `lengths` names a time domain: a misspelt one would be silently ignored
    unknown = sorted(set(lengths or ()) - set(domains))
    if unknown:
        raise KeyError(
            f"lengths[{unknown[0]!r}]: no time domain of that name; this model's: "
            + ", ".join(map(repr, domains)) + " (a domain is named after its first input)"
        )


def step_mask(lengths, name, T, B, window=None):
    # [T, B] bool: step t of sequence b is inside its length; None when all are full (in a
    # window of a longer sequence, a sequence that ended before it has no step here: 0)
    if lengths is None or name not in lengths:
        return None
    L = np.asarray(lengths[name])
    if L.shape != (B,) or L.min() < (window is None) or L.max() > T:
        raise ValueError(f"lengths[{name!r}] must hold {B} lengths in {int(window is None)}..{T}")
    return np.arange(T)[:, None] < L[None, :]


def zero_padding(h, M, Ms=None):
    # steps past each sequence's end are 0 (as torch's pad_packed_sequence gives them); with
    # Ms, h is [T, S, B, ...] (a value per step s of another sequence) and past its end too
    if Ms is not None:
        h = h * Ms.reshape(Ms.shape + (1,) * (h.ndim - 3))
        M = None if M is None else M[:, None]
    if M is None:
        return h
    return h * M.reshape(M.shape + (1,) * (h.ndim - M.ndim))


def final_rows(h, past, T, M):
    # the last `past` steps of each sequence (rows L .. L + past - 1 of h padded with `past`
    # rows in front): the state a next window starts from, at each sequence's own length
    if M is None:
        return h[T : T + past]
    L = M.sum(axis=0)
    rows = L[None, :] + np.arange(past)[:, None]
    return h[rows, np.arange(h.shape[1])[None, :]]


def initialize(rng, shape, kind, args):
    # parameter initializers; a matrix defaults to glorot, a vector to zeros
    if kind is None:
        kind = "glorot" if len(shape) == 2 else "zeros"
    if kind == "zeros":
        return np.zeros(shape)
    if kind == "constant":
        return np.full(shape, args[0])
    if kind == "uniform":
        a, b = args if len(args) == 2 else (-args[0], args[0]) if args else (-0.1, 0.1)
        return rng.uniform(a, b, shape)
    if kind == "normal":
        mean, std = args if len(args) == 2 else (0.0, args[0]) if args else (0.0, 0.01)
        return rng.normal(mean, std, shape)
    if kind in ("glorot", "xavier"):
        fan_out, fan_in = shape if len(shape) == 2 else (shape[0], shape[0])
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape)
    if kind == "orthogonal":
        if len(shape) != 2:
            return rng.normal(0, 1, shape) / np.sqrt(shape[0])
        a = rng.normal(0.0, 1.0, (max(shape), min(shape)))
        q, r = np.linalg.qr(a)
        q = q * np.sign(np.diag(r))
        return q if shape[0] >= shape[1] else q.T
    raise ValueError(f"unknown initializer {kind!r}")
