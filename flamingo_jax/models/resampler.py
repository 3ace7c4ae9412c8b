"""Perceiver Resampler: any number of frames x spatial tokens -> a fixed number of visual tokens.

x = x + time_embed[t]                       (per frame; no spatial position embeddings)
x = flatten(frames x space)
for each layer:
    latents += Attn(q = LN(latents), kv = concat(LN(x), LN(latents)))
    latents += FFW(LN(latents))             (Squared ReLU)
return LN(latents)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import attention, layers, stacking

Array = jax.Array


def interpolate_time_embeddings(table: Array, num_frames: int) -> Array:
    """The first `num_frames` rows of the [T_max, D] table, or, for longer videos, the table linearly
    interpolated to `num_frames` rows (evaluation on 30 frames with a model trained on 8)."""
    t_max = table.shape[0]
    if num_frames <= t_max:
        return table[:num_frames]
    src = jnp.linspace(0.0, t_max - 1.0, num_frames)
    lo = jnp.floor(src).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, t_max - 1)
    w = (src - lo)[:, None].astype(table.dtype)
    return table[lo] * (1 - w) + table[hi] * w


class ResamplerLayer(nnx.Module):
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        head_dim: int,
        ffw_mult: int,
        norm_eps: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        attention_impl: str,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=norm_eps, axis_name="vision_embed", param_dtype=param_dtype, rngs=rngs)
        ax = ("vision_embed", "heads", "head_dim")
        self.media_norm = layers.LayerNorm(dim, **norm)
        self.latent_norm = layers.LayerNorm(dim, **norm)
        self.q = layers.DenseGeneral(dim, (num_heads, head_dim), ax, **kw)
        self.k = layers.DenseGeneral(dim, (num_heads, head_dim), ax, **kw)
        self.v = layers.DenseGeneral(dim, (num_heads, head_dim), ax, **kw)
        self.o = layers.DenseGeneral((num_heads, head_dim), dim, ("heads", "head_dim", "vision_embed"), **kw)
        self.ffw_norm = layers.LayerNorm(dim, **norm)
        self.ffw_up = layers.DenseGeneral(dim, ffw_mult * dim, ("vision_embed", "mlp"), **kw)
        self.ffw_down = layers.DenseGeneral(ffw_mult * dim, dim, ("mlp", "vision_embed"), **kw)
        self.attention_impl = attention_impl

    def __call__(self, latents: Array, x: Array) -> Array:
        lat = self.latent_norm(latents)
        kv = jnp.concatenate([self.media_norm(x), lat], axis=1)
        out = attention.dot_product_attention(self.q(lat), self.k(kv), self.v(kv), implementation=self.attention_impl)
        latents = latents + self.o(out)
        h = layers.squared_relu(self.ffw_up(self.ffw_norm(latents)))
        return latents + self.ffw_down(h)


class PerceiverResampler(nnx.Module):
    def __init__(
        self,
        dim: int,
        *,
        num_layers: int = 6,
        num_latents: int = 64,
        num_heads: int = 16,
        head_dim: int = 128,
        ffw_mult: int = 4,
        max_frames: int = 8,
        norm_eps: float = 1e-5,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        attention_impl: str = "xla",
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        self.remat = remat
        self.latents = layers.param(
            rngs, nnx.initializers.normal(1.0), (num_latents, dim), ("latents", "vision_embed"), param_dtype
        )
        self.time_embed = layers.param(
            rngs, nnx.initializers.normal(0.02), (max_frames, dim), ("frames", "vision_embed"), param_dtype
        )
        self.layers = stacking.stack(
            lambda r: ResamplerLayer(
                dim,
                num_heads=num_heads,
                head_dim=head_dim,
                ffw_mult=ffw_mult,
                norm_eps=norm_eps,
                dtype=dtype,
                param_dtype=param_dtype,
                attention_impl=attention_impl,
                rngs=r,
            ),
            num_layers,
            rngs,
        )
        self.final_norm = layers.LayerNorm(
            dim, eps=norm_eps, axis_name="vision_embed", param_dtype=param_dtype, rngs=rngs
        )
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        """x [B, T, S, D] (frames x spatial tokens) -> [B, num_latents, D]."""
        b, t, s, d = x.shape
        x = x.astype(self.dtype) + interpolate_time_embeddings(self.time_embed[...], t).astype(self.dtype)[:, None]
        x = sharding.constrain(x.reshape(b, t * s, d), ("batch", "length", "vision_embed"))
        latents = jnp.broadcast_to(self.latents[...].astype(self.dtype), (b, *self.latents.shape))
        graphdef, state = nnx.split(self.layers)
        latents, _ = stacking.scan(
            lambda layer, lat, _: (layer(lat, x), None), graphdef, state, latents, remat=self.remat
        )
        return self.final_norm(latents)
