"""Hand-written NumPy LSTM, GRU and tanh RNN, as a careful person writes them: the input
projection hoisted out of the loop as one GEMM, the gates fused into one GEMM per step,
weight gradients as GEMMs after the backward loop. The reference for bench_numpy.py."""

from __future__ import annotations

import numpy as np


def sigmoid(x):
    return 0.5 * np.tanh(0.5 * x) + 0.5


def mse_grad(h, y):
    _, B, H = h.shape
    d = h - y
    return float((d * d).sum() / (H * B)), d * (2.0 / (H * B))


def lstm(p, x, y, backward=True):
    Wx, Wh, b = p["Wx"], p["Wh"], p["b"]  # [4H, I], [4H, H], [4H]; gates f, i, g, o
    T, B, I = x.shape
    H = Wh.shape[1]
    xW = (x.reshape(T * B, I) @ Wx.T).reshape(T, B, 4 * H) + b
    h = np.zeros((T + 1, B, H), x.dtype)
    c = np.zeros((T + 1, B, H), x.dtype)
    act = np.empty((T, B, 4 * H), x.dtype)
    tc = np.empty((T, B, H), x.dtype)
    for t in range(T):
        a = xW[t] + h[t] @ Wh.T
        act[t, :, : 2 * H] = sigmoid(a[:, : 2 * H])
        act[t, :, 2 * H : 3 * H] = np.tanh(a[:, 2 * H : 3 * H])
        act[t, :, 3 * H :] = sigmoid(a[:, 3 * H :])
        f, i, g, o = (
            act[t, :, :H],
            act[t, :, H : 2 * H],
            act[t, :, 2 * H : 3 * H],
            act[t, :, 3 * H :],
        )
        c[t + 1] = f * c[t] + i * g
        tc[t] = np.tanh(c[t + 1])
        h[t + 1] = o * tc[t]
    loss, dh_out = mse_grad(h[1:], y)
    if not backward:
        return loss, None
    dG = np.empty((T, B, 4 * H), x.dtype)
    dh = np.zeros((B, H), x.dtype)
    dc = np.zeros((B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        dh = dh + dh_out[t]
        f, i, g, o = (
            act[t, :, :H],
            act[t, :, H : 2 * H],
            act[t, :, 2 * H : 3 * H],
            act[t, :, 3 * H :],
        )
        dc = dc + dh * o * (1 - tc[t] * tc[t])
        dG[t, :, :H] = dc * c[t] * f * (1 - f)
        dG[t, :, H : 2 * H] = dc * g * i * (1 - i)
        dG[t, :, 2 * H : 3 * H] = dc * i * (1 - g * g)
        dG[t, :, 3 * H :] = dh * tc[t] * o * (1 - o)
        dh = dG[t] @ Wh
        dc = dc * f
    G = dG.reshape(T * B, 4 * H)
    grads = {"Wh": G.T @ h[:-1].reshape(T * B, H), "Wx": G.T @ x.reshape(T * B, I), "b": G.sum(0)}
    return loss, grads


def gru(p, x, y, backward=True):
    Wx, Wh, bx, bhn = p["Wx"], p["Wh"], p["bx"], p["bhn"]  # gates r, z, n
    T, B, I = x.shape
    H = Wh.shape[1]
    xW = (x.reshape(T * B, I) @ Wx.T).reshape(T, B, 3 * H) + bx
    h = np.zeros((T + 1, B, H), x.dtype)
    rz = np.empty((T, B, 2 * H), x.dtype)
    n = np.empty((T, B, H), x.dtype)
    hn = np.empty((T, B, H), x.dtype)
    for t in range(T):
        a = h[t] @ Wh.T
        rz[t] = sigmoid(xW[t, :, : 2 * H] + a[:, : 2 * H])
        hn[t] = a[:, 2 * H :] + bhn
        n[t] = np.tanh(xW[t, :, 2 * H :] + rz[t, :, :H] * hn[t])
        z = rz[t, :, H:]
        h[t + 1] = (1 - z) * n[t] + z * h[t]
    loss, dh_out = mse_grad(h[1:], y)
    if not backward:
        return loss, None
    dX = np.empty((T, B, 3 * H), x.dtype)
    dA = np.empty((T, B, 3 * H), x.dtype)
    dh = np.zeros((B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        dh = dh + dh_out[t]
        r, z = rz[t, :, :H], rz[t, :, H:]
        dn = dh * (1 - z) * (1 - n[t] * n[t])
        dz = dh * (h[t] - n[t]) * z * (1 - z)
        dr = dn * hn[t] * r * (1 - r)
        dX[t, :, :H], dX[t, :, H : 2 * H], dX[t, :, 2 * H :] = dr, dz, dn
        dA[t, :, :H], dA[t, :, H : 2 * H], dA[t, :, 2 * H :] = dr, dz, dn * r
        dh = dh * z + dA[t] @ Wh
    X, A = dX.reshape(T * B, 3 * H), dA.reshape(T * B, 3 * H)
    grads = {"Wx": X.T @ x.reshape(T * B, I), "Wh": A.T @ h[:-1].reshape(T * B, H),
             "bx": X.sum(0), "bhn": A[:, 2 * H :].sum(0)}  # fmt: skip
    return loss, grads


def rnn(p, x, y, backward=True):
    U, W, b = p["U"], p["W"], p["b"]
    T, B, I = x.shape
    H = W.shape[0]
    xU = (x.reshape(T * B, I) @ U.T).reshape(T, B, H) + b
    h = np.zeros((T + 1, B, H), x.dtype)
    for t in range(T):
        h[t + 1] = np.tanh(xU[t] + h[t] @ W.T)
    loss, dh_out = mse_grad(h[1:], y)
    if not backward:
        return loss, None
    dA = np.empty((T, B, H), x.dtype)
    dh = np.zeros((B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        dh = dh + dh_out[t]
        dA[t] = dh * (1 - h[t + 1] * h[t + 1])
        dh = dA[t] @ W
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
