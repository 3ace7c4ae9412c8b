"""CLIP ViT vision tower (Radford et al. 2021), as a frozen vision encoder for the CLIP-based family members.

Architecture of OpenAI CLIP / HF `CLIPVisionModel`: a non-overlapping patch conv without bias, a learned class
token, learned absolute position embeddings, a LayerNorm before the encoder (`pre_norm`), pre-norm transformer
layers (LayerNorm, multi-head attention with biases, MLP with quick_gelu), and a final LayerNorm (`post_norm`)
that HF applies only to the pooled class token.

The layers are stacked (leading `layers` dim) and scanned. Parameter dims carry logical axes: the model
width is `vision_embed` (like the Perceiver Resampler that consumes these tokens), attention dims
`heads`/`head_dim`, the MLP hidden dim `mlp`, the patch kernel `conv_h`/`conv_w`/`conv_in`, and the position
table `length`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import attention, layers, stacking

Array = jax.Array

_TOKEN_AXES = ("vision_batch", "length", "vision_embed")

# OpenAI CLIP's image statistics: every CLIP tower expects inputs normalised with these, not ImageNet's.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's GELU approximation `x * sigmoid(1.702 x)`; the pretrained weights expect exactly this."""
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str) -> Callable[[Array], Array]:
    return quick_gelu if name == "quick_gelu" else layers.activation(name)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    act: str = "quick_gelu"
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image including the class token (257 for ViT-L/14 at 224px)."""
        return self.grid**2 + 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"vit: unknown fields {unknown}")
        return cls(**d)

    def validate(self, prefix: str = "vit") -> None:
        for name in ("image_size", "patch_size", "width", "num_layers", "num_heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{prefix}.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"{prefix}.patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.width % self.num_heads:
            raise ValueError(f"{prefix}.num_heads={self.num_heads} must divide width={self.width}")
        _activation(self.act)


class ViTBlock(nnx.Module):
    """`x += attn(ln1(x)); x += mlp(ln2(x))`, bidirectional attention, biases everywhere."""

    def __init__(
        self, cfg: ViTConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, attention_impl: str, rngs: nnx.Rngs
    ):
        d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
        norm = dict(eps=cfg.norm_eps, axis_name="vision_embed", param_dtype=param_dtype, rngs=rngs)
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = layers.LayerNorm(d, **norm)
        self.q = layers.DenseGeneral(d, (h, hd), ("vision_embed", "heads", "head_dim"), **kw)
        self.k = layers.DenseGeneral(d, (h, hd), ("vision_embed", "heads", "head_dim"), **kw)
        self.v = layers.DenseGeneral(d, (h, hd), ("vision_embed", "heads", "head_dim"), **kw)
        self.o = layers.DenseGeneral((h, hd), d, ("heads", "head_dim", "vision_embed"), **kw)
        self.mlp_norm = layers.LayerNorm(d, **norm)
        self.fc1 = layers.DenseGeneral(d, cfg.mlp_dim, ("vision_embed", "mlp"), **kw)
        self.fc2 = layers.DenseGeneral(cfg.mlp_dim, d, ("mlp", "vision_embed"), **kw)
        self.act = _activation(cfg.act)
        self.attention_impl = attention_impl

    def __call__(self, x: Array) -> Array:
        y = self.attn_norm(x)
        q = sharding.constrain(self.q(y), ("vision_batch", "length", "heads", "head_dim"))
        a = attention.dot_product_attention(q, self.k(y), self.v(y), implementation=self.attention_impl)
        x = x + self.o(a)
        h = self.act(self.fc1(self.mlp_norm(x)))
        h = sharding.constrain(h, ("vision_batch", "length", "mlp"))
        return sharding.constrain(x + self.fc2(h), _TOKEN_AXES)


class VisionTransformer(nnx.Module):
    """CLIP's ViT image tower. `features` gives per-token outputs, `pooled` the normalised class token."""

    def __init__(
        self,
        cfg: ViTConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        attention_impl: str = "xla",
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        cfg.validate()
        if remat not in stacking.REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(stacking.REMAT_POLICIES)}")
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        d, p = cfg.width, cfg.patch_size
        self.patch_embed = layers.param(
            rngs,
            layers.fan_in_init(),
            (p, p, 3, d),
            ("conv_h", "conv_w", "conv_in", "vision_embed"),
            param_dtype,
        )
        self.cls_token = layers.param(rngs, nnx.initializers.normal(d**-0.5), (d,), ("vision_embed",), param_dtype)
        self.pos_embed = layers.param(
            rngs, nnx.initializers.normal(0.02), (cfg.num_tokens, d), ("length", "vision_embed"), param_dtype
        )
        norm = dict(eps=cfg.norm_eps, axis_name="vision_embed", param_dtype=param_dtype, rngs=rngs)
        self.pre_norm = layers.LayerNorm(d, **norm)
        self.layers = stacking.stack(
            lambda r: ViTBlock(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=r),
            cfg.num_layers,
            rngs,
        )
        self.post_norm = layers.LayerNorm(d, **norm)

    def _embed(self, images: Array) -> Array:
        b, h, w, c = images.shape
        size = self.cfg.image_size
        if (h, w, c) != (size, size, 3):
            # The position table is learned for one grid; resizing it would silently change the features.
            raise ValueError(f"ViT expects [B, {size}, {size}, 3] images, got {tuple(images.shape)}")
        x = jax.lax.conv_general_dilated(
            images.astype(self.dtype),
            self.patch_embed[...].astype(self.dtype),
            window_strides=(self.cfg.patch_size,) * 2,
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        x = x.reshape(b, -1, self.cfg.width)
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, self.cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(self.dtype)
        return sharding.constrain(self.pre_norm(x), _TOKEN_AXES)

    def features(self, images: Array, *, cls_token: bool = True, post_norm: bool = False) -> Array:
        """Token features [B, tokens, width] for NHWC float `images` (normalised with CLIP's mean/std).

        The defaults give exactly HF's `CLIPVisionModel(...).last_hidden_state`: the class token first, then
        the grid of patch tokens row-major, all from the last layer *before* the final LayerNorm (which HF
        applies to the pooled class token only). `cls_token=False` drops the class token (grid**2 patch
        tokens); `post_norm=True` applies the final LayerNorm to every token (open_clip's `output_tokens`, as
        used by OpenFlamingo).
        """
        x = self._embed(images)
        graphdef, state = nnx.split(self.layers)
        x, _ = stacking.scan(lambda layer, h, _: (layer(h), None), graphdef, state, x, remat=self.remat)
        if post_norm:
            x = self.post_norm(x)
        return x if cls_token else x[:, 1:]

    def pooled(self, images: Array) -> Array:
        """The final-normalised class token [B, width]: HF's `pooler_output` (before CLIP's projection)."""
        return self.post_norm(self.features(images)[:, 0])
