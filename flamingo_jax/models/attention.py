"""Scaled dot-product attention with a selectable kernel (rotary position embeddings: `rope.py`)."""

from __future__ import annotations

import jax

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
