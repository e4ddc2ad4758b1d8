"""Hand-written NumPy LSTM, GRU and tanh RNN, tuned as a careful person writes them: the input
projection hoisted out of the loop as one GEMM, the gates fused into one GEMM per step, the
sigmoid gates folded into one tanh call with the tanh gate (their weight rows halved once),
every pointwise step in place into preallocated buffers, the backward pass's step-independent
derivative factors made in cache-sized chunks of steps just before the loop reads them, weight
gradients as GEMMs after the backward loop. The yardstick of bench_numpy.py; its gradients
equal the NumPy target's in float64 (tests/test_bench_scripts.py)."""

from __future__ import annotations

import numpy as np


def sigmoid(x):
    return 0.5 * np.tanh(0.5 * x) + 0.5


def mse_grad(h, y):
    _, B, H = h.shape
    d = h - y
    return float((d * d).sum() / (H * B)), d * (2.0 / (H * B))


CHUNK = 16  # steps whose derivative factors are made at once, just before the backward loop reads them


def chunks(T: int):
    """The backward loop's steps in chunks, last first: (lo, hi) with the steps hi-1 .. lo."""
    for hi in range(T, 0, -CHUNK):
        yield max(hi - CHUNK, 0), hi


def halved(W, rows: slice):
    """W with the rows of its sigmoid gates halved: sigmoid(a) = 0.5 + 0.5 tanh(a / 2), so one
    tanh over all the gates' pre-activations gives every gate."""
    W = W.copy()
    W[rows] *= 0.5
    return W


def lstm(p, x, y, backward=True):
    """Gates f, i, g, o as the spec's; sigmoid gates f, i, o through one tanh call over all four
    (their rows of the weights halved once), every pointwise step in place into preallocated
    buffers, the backward pass's step-independent factors made in chunks of CHUNK steps."""
    Wx, Wh, b = p["Wx"], p["Wh"], p["b"]  # [4H, I], [4H, H], [4H]
    T, B, I = x.shape
    H = Wh.shape[1]
    order = np.r_[0 : 2 * H, 3 * H : 4 * H, 2 * H : 3 * H]  # f, i, o, g: the sigmoid gates first
    sig = slice(0, 3 * H)
    Wxs, Whs, bs = halved(Wx[order], sig), halved(Wh[order], sig), halved(b[order, None], sig)[:, 0]
    a = (x.reshape(T * B, I) @ Wxs.T).reshape(T, B, 4 * H)
    a += bs
    h = np.zeros((T + 1, B, H), x.dtype)
    c = np.zeros((T + 1, B, H), x.dtype)
    tc = np.empty((T, B, H), x.dtype)
    step = np.empty((B, 4 * H), x.dtype)
    ig = np.empty((B, H), x.dtype)
    for t in range(T):
        np.matmul(h[t], Whs.T, out=step)
        act = a[t]  # the activations replace the pre-activations
        act += step
        np.tanh(act, out=act)
        act[:, sig] *= 0.5
        act[:, sig] += 0.5
        f, i, o, g = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
        np.multiply(f, c[t], out=c[t + 1])
        np.multiply(i, g, out=ig)
        c[t + 1] += ig
        np.tanh(c[t + 1], out=tc[t])
        np.multiply(o, tc[t], out=h[t + 1])
    loss, dh_out = mse_grad(h[1:], y)
    if not backward:
        return loss, None
    dG = np.empty((T, B, 4 * H), x.dtype)  # in the order f, i, o, g
    dh = np.zeros((B, H), x.dtype)
    dc = np.zeros((B, H), x.dtype)
    tmp = np.empty((B, H), x.dtype)
    Who = Wh[order]
    for lo, hi in chunks(T):
        act = a[lo:hi]
        f, i, o, g = act[..., :H], act[..., H : 2 * H], act[..., 2 * H : 3 * H], act[..., 3 * H :]
        # what the steps' adjoints are multiplied by, none of which depends on them
        K = np.empty((hi - lo, B, 4 * H), x.dtype)
        K[..., :H] = c[lo:hi] * f * (1 - f)  # f
        K[..., H : 2 * H] = g * i * (1 - i)  # i
        K[..., 2 * H : 3 * H] = tc[lo:hi] * o * (1 - o)  # o, times dh
        K[..., 3 * H :] = i * (1 - g * g)  # g
        Kc = o * (1 - tc[lo:hi] * tc[lo:hi])
        for t in range(hi - 1, lo - 1, -1):
            k, row = t - lo, dG[t]
            dh += dh_out[t]
            np.multiply(dh, Kc[k], out=tmp)
            dc += tmp
            np.multiply(dc, K[k, :, :H], out=row[:, :H])
            np.multiply(dc, K[k, :, H : 2 * H], out=row[:, H : 2 * H])
            np.multiply(dh, K[k, :, 2 * H : 3 * H], out=row[:, 2 * H : 3 * H])
            np.multiply(dc, K[k, :, 3 * H :], out=row[:, 3 * H :])
            np.matmul(row, Who, out=dh)
            dc *= f[k]
    G = dG.reshape(T * B, 4 * H)
    back = np.argsort(order)  # f, i, o, g -> the spec's f, i, g, o
    grads = {"Wh": (G.T @ h[:-1].reshape(T * B, H))[back], "Wx": (G.T @ x.reshape(T * B, I))[back],
             "b": G.sum(0)[back]}  # fmt: skip
    return loss, grads


def gru(p, x, y, backward=True):
    """Gates r, z, n; r and z through one tanh call (rows halved), n's tanh its own; in place;
    the backward pass's step-independent factors in chunks."""
    Wx, Wh, bx, bhn = p["Wx"], p["Wh"], p["bx"], p["bhn"]
    T, B, I = x.shape
    H = Wh.shape[1]
    sig = slice(0, 2 * H)
    Wxs, Whs, bxs = halved(Wx, sig), halved(Wh, sig), halved(bx[:, None], sig)[:, 0]
    xa = (x.reshape(T * B, I) @ Wxs.T).reshape(T, B, 3 * H)
    xa += bxs
    h = np.zeros((T + 1, B, H), x.dtype)
    hn = np.empty((T, B, H), x.dtype)  # Wh_n h + bhn, read by the backward pass
    step = np.empty((B, 3 * H), x.dtype)
    for t in range(T):
        np.matmul(h[t], Whs.T, out=step)
        rz = xa[t, :, : 2 * H]  # becomes r, z
        rz += step[:, : 2 * H]
        np.tanh(rz, out=rz)
        rz *= 0.5
        rz += 0.5
        np.add(step[:, 2 * H :], bhn, out=hn[t])
        n = xa[t, :, 2 * H :]  # becomes n
        np.multiply(rz[:, :H], hn[t], out=step[:, 2 * H :])
        n += step[:, 2 * H :]
        np.tanh(n, out=n)
        np.subtract(h[t], n, out=h[t + 1])  # h = n + z * (h[t-1] - n)
        h[t + 1] *= rz[:, H:]
        h[t + 1] += n
    loss, dh_out = mse_grad(h[1:], y)
    if not backward:
        return loss, None
    dX = np.empty((T, B, 3 * H), x.dtype)
    dA = np.empty((T, B, 3 * H), x.dtype)
    dh = np.zeros((B, H), x.dtype)
    tmp = np.empty((B, H), x.dtype)
    for lo, hi in chunks(T):
        r, z, n = xa[lo:hi, :, :H], xa[lo:hi, :, H : 2 * H], xa[lo:hi, :, 2 * H :]
        Kn = (1 - z) * (1 - n * n)  # dn = dh Kn
        Kz = (h[lo:hi] - n) * z * (1 - z)  # dz = dh Kz
        Kr = hn[lo:hi] * r * (1 - r)  # dr = dn Kr
        for t in range(hi - 1, lo - 1, -1):
            k, X, A = t - lo, dX[t], dA[t]
            dh += dh_out[t]
            np.multiply(dh, Kn[k], out=X[:, 2 * H :])
            np.multiply(dh, Kz[k], out=X[:, H : 2 * H])
            np.multiply(X[:, 2 * H :], Kr[k], out=X[:, :H])
            A[:, : 2 * H] = X[:, : 2 * H]
            np.multiply(X[:, 2 * H :], r[k], out=A[:, 2 * H :])
            np.multiply(dh, z[k], out=tmp)
            np.matmul(A, Wh, out=dh)
            dh += tmp
    X, A = dX.reshape(T * B, 3 * H), dA.reshape(T * B, 3 * H)
    grads = {"Wx": X.T @ x.reshape(T * B, I), "Wh": A.T @ h[:-1].reshape(T * B, H),
             "bx": X.sum(0), "bhn": A[:, 2 * H :].sum(0)}  # fmt: skip
    return loss, grads


def rnn(p, x, y, backward=True):
    """h = tanh(U x + W h[t-1] + b) in place; the backward pass's (1 - h^2) in chunks."""
    U, W, b = p["U"], p["W"], p["b"]
    T, B, I = x.shape
    H = W.shape[0]
    xU = (x.reshape(T * B, I) @ U.T).reshape(T, B, H)
    xU += b
    h = np.zeros((T + 1, B, H), x.dtype)
    for t in range(T):
        np.matmul(h[t], W.T, out=h[t + 1])
        h[t + 1] += xU[t]
        np.tanh(h[t + 1], out=h[t + 1])
    loss, dh_out = mse_grad(h[1:], y)
    if not backward:
        return loss, None
    dA = np.empty((T, B, H), x.dtype)
    dh = np.zeros((B, H), x.dtype)
    for lo, hi in chunks(T):
        D = 1 - h[lo + 1 : hi + 1] * h[lo + 1 : hi + 1]
        for t in range(hi - 1, lo - 1, -1):
            dh += dh_out[t]
            np.multiply(dh, D[t - lo], out=dA[t])
            np.matmul(dA[t], W, out=dh)
    A = dA.reshape(T * B, H)
    grads = {"U": A.T @ x.reshape(T * B, I), "W": A.T @ h[:-1].reshape(T * B, H), "b": A.sum(0)}
    return loss, grads


def from_spec(kind: str, params: dict) -> dict:
    """The hand-written layout of a compiled model's parameters (so both compute the same)."""
    if kind == "rnn":
        return {"U": params["U"], "W": params["W"], "b": params["b"]}
    if kind == "lstm":
        Ws = [params[f"h.W{g}"] for g in "figo"]
        H = Ws[0].shape[0]
        return {"Wh": np.concatenate([w[:, :H] for w in Ws]), "Wx": np.concatenate([w[:, H:] for w in Ws]),
                "b": np.concatenate([params[f"h.b{g}"] for g in "figo"])}  # fmt: skip
    return {"Wx": np.concatenate([params[f"h.W{g}"] for g in "rzn"]),
            "Wh": np.concatenate([params[f"h.U{g}"] for g in "rzn"]),
            "bx": np.concatenate([params[f"h.b{g}"] for g in "rzn"]), "bhn": params["h.bhn"]}  # fmt: skip


IMPLS = {"lstm": lstm, "gru": gru, "rnn": rnn}
