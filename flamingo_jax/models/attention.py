"""Scaled dot-product attention with a selectable kernel, and rotary position embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("xla", "cudnn")


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    is_causal: bool = False,
    implementation: str = "xla",
) -> Array:
    """softmax(q k^T / sqrt(d)) v with q [B, Lq, H, D], k/v [B, Lk, Hkv, D] (H a multiple of Hkv: GQA).

    `mask` is boolean, broadcastable to [B, H, Lq, Lk], True where attention is allowed. A query row whose keys
    are all masked gets uniform weights here; callers that need exact zeros (media cross-attention) zero it.
    `cudnn` is the fused flash-attention kernel on NVIDIA GPUs (bf16/fp16 only).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: choose one of {IMPLEMENTATIONS}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation).astype(
        q.dtype
    )


def rotary_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin tables [B, L, head_dim] for integer positions [B, L] (the half-split layout of HF LLaMA)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates x [B, L, H, D] by the tables [B, L, D]; computed in float32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
