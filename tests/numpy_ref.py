"""Float64 NumPy references for the model components, written from the paper's equations, independent of
the JAX code (no shared helpers)."""

from __future__ import annotations

import numpy as np


def to64(tree):
    """A nested dict of jax/numpy arrays (from nnx.State.to_pure_dict()) as float64 NumPy."""
    if isinstance(tree, dict):
        return {k: to64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def layer_norm(x, scale, bias=None, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * scale
    return y if bias is None else y + bias


def rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def attention(q, k, v, mask=None):
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D], mask [B|1, H|1, Lq, Lk] bool. Per-head loops, no broadcasting
    tricks shared with the JAX code."""
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    out = np.zeros((b, lq, h, d))
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hkv)
            s = q[bi, :, hi] @ k[bi, :, kh].T / np.sqrt(d)
            if mask is not None:
                m = np.broadcast_to(mask, (b, h, lq, k.shape[1]))[bi, hi]
                s = np.where(m, s, -np.inf)
                rows = m.any(-1)
                s = np.where(rows[:, None], s, 0.0)  # fully masked rows: uniform (callers zero them)
            out[bi, :, hi] = softmax(s) @ v[bi, :, kh]
    return out


def dense(x, kernel, bias=None, n_in=1):
    """Contract the last n_in dims of x with the first n_in dims of kernel."""
    y = np.tensordot(x, kernel, axes=(list(range(x.ndim - n_in, x.ndim)), list(range(n_in))))
    return y if bias is None else y + bias


def squared_relu(x):
    return np.maximum(x, 0.0) ** 2
