"""GATED XATTN-DENSE: tanh-gated cross-attention from text to visual tokens, and the media masking rule.

    y = y + tanh(alpha_xattn) * XAttn(LN(y), visual)
    y = y + tanh(alpha_ffw)   * FFW(LN(y))

Both gates start at 0 (`gate_init`), so an untrained Flamingo computes exactly what its frozen LM computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import attention, layers

Array = jax.Array


def media_index(
    ids: Array,
    image_token_id: int,
    *,
    link_next: Array | None = None,
    num_media: int | None = None,
    images_before: Array | None = None,
) -> Array:
    """Index of the image each token attends to, -1 for none. ids [B, L] -> int32 [B, L].

    By default token l sees the last `<image>` at or before l: phi(l) - 1 with phi the running count of
    `<image>` tokens. Where `link_next` [B] is set (M3W's p_next), a token sees the first image at or after it
    instead (so an `<image>` token sees its own image in both modes), and none if no image follows within the
    `num_media` present. `images_before` [B] counts images in
    earlier chunks (decoding with a cache).
    """
    is_image = (ids == image_token_id).astype(jnp.int32)
    count = jnp.cumsum(is_image, axis=1)
    if images_before is not None:
        count = count + images_before[:, None]
    idx = count - 1
    if link_next is not None:
        following = jnp.where(count - is_image < count[:, -1:], count - is_image, -1)
        idx = jnp.where(link_next[:, None], following, idx)
    if num_media is not None:
        # An index past the media present would match no key and get the uniform masked-softmax average.
        idx = jnp.where(idx < num_media, idx, -1)
    return idx


def media_attention_mask(media_idx: Array, num_media: int, tokens_per_media: int) -> Array:
    """Boolean mask [B, 1, L, num_media * tokens_per_media]: token l may attend to image media_idx[l]'s tokens.

    A token that sees no image (media_idx -1) is allowed every key instead of none, and the caller zeroes its
    output. A row with every key masked gives a uniform average under XLA but NaN gradients under cuDNN's flash
    kernel (measured on an H100: dq non-finite while the forward looks fine), so no row is ever left empty.
    """
    key_media = jnp.repeat(jnp.arange(num_media), tokens_per_media)
    mask = (media_idx[:, :, None] == key_media[None, None, :]) | (media_idx < 0)[:, :, None]
    return mask[:, None]


class GatedCrossAttention(nnx.Module):
    """One GATED XATTN-DENSE block; text width `dim`, visual width `vision_dim`."""

    def __init__(
        self,
        dim: int,
        vision_dim: int,
        *,
        num_heads: int,
        head_dim: int,
        ffw_mult: int = 4,
        norm_eps: float = 1e-5,
        gate_init: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        attention_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = layers.LayerNorm(dim, eps=norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.q = layers.DenseGeneral(dim, (num_heads, head_dim), ("embed", "heads", "head_dim"), **kw)
        self.k = layers.DenseGeneral(vision_dim, (num_heads, head_dim), ("vision_embed", "heads", "head_dim"), **kw)
        self.v = layers.DenseGeneral(vision_dim, (num_heads, head_dim), ("vision_embed", "heads", "head_dim"), **kw)
        self.o = layers.DenseGeneral((num_heads, head_dim), dim, ("heads", "head_dim", "embed"), **kw)
        gate = nnx.initializers.constant(gate_init)
        self.attn_gate = layers.param(rngs, gate, (), (), param_dtype)
        self.ffw_norm = layers.LayerNorm(dim, eps=norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.ffw = layers.FeedForward(dim, ffw_mult * dim, act="squared_relu", **kw)
        self.ffw_gate = layers.param(rngs, gate, (), (), param_dtype)
        self.attention_impl = attention_impl

    def __call__(self, y: Array, visual: Array, media_idx: Array) -> Array:
        """y [B, L, dim]; visual [B, N, latents, vision_dim]; media_idx [B, L] from `media_index`."""
        b, n, m, _ = visual.shape
        q = self.q(self.attn_norm(y))
        kv = visual.reshape(b, n * m, visual.shape[-1])
        k, v = self.k(kv), self.v(kv)
        mask = media_attention_mask(media_idx, n, m)
        out = attention.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
        # Tokens that see no image attended to everything (see media_attention_mask): they get exactly zero.
        out = jnp.where((media_idx >= 0)[:, :, None, None], out, 0).astype(out.dtype)
        out = sharding.constrain(out, ("batch", "length", "heads", "head_dim"))
        y = y + jnp.tanh(self.attn_gate[...]).astype(y.dtype) * self.o(out)
        y = y + jnp.tanh(self.ffw_gate[...]).astype(y.dtype) * self.ffw(self.ffw_norm(y))
        return sharding.constrain(y, ("batch", "length", "embed"))
