"""Stage 1: the dual encoder that pretrains Flamingo's vision tower contrastively (paper, section 3.1 and B.1.3).

A vision encoder (any of `flamingo.vision_tower`'s) and a BERT-style text encoder are each projected to a joint
embedding (the paper: 1376 dims) and L2-normalised. The loss is the mean of the image-to-text and text-to-image
InfoNCE losses over the whole global batch, at a trainable inverse temperature (CLIP's `logit_scale`, kept as its
log so it stays positive, and capped so that it cannot run away).

Negatives are the global batch, not a device's share of it: `contrastive_loss` gathers the embeddings of the
other side over the batch's mesh axes (a sharding constraint, so XLA inserts the all-gather) while each device
keeps its own rows of the similarity matrix. The loss on a sharded mesh is then the single-device loss of the same
global batch, and memory per device grows with (local rows x global batch), not with the global batch squared.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import layers, nfnet, stacking
from flamingo_jax.models import text_encoder as text_lib
from flamingo_jax.models.flamingo import VisionConfig, path_str, vision_tower

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    vision: VisionConfig
    text: text_lib.TextConfig
    embed_dim: int = 1376
    # CLIP's initial logit scale (1 / 0.07) and its cap.
    init_inverse_temperature: float = 1 / 0.07
    max_inverse_temperature: float = 100.0
    trainable: tuple[str, ...] = (".*",)  # stage 1 trains both towers from scratch
    # Start the text tower from a Hugging Face BertModel directory (its config.json replaces `text`).
    text_pretrained: str = ""
    dtype: str = "float32"
    param_dtype: str = "float32"
    frozen_param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContrastiveConfig:
        d = dict(d)
        vision = dict(d.pop("vision", {}) or {})
        known = {f.name for f in dataclasses.fields(VisionConfig)}
        if sorted(set(vision) - known):
            raise ValueError(f"model.vision: unknown fields {sorted(set(vision) - known)}")
        vision = VisionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vision.items()})
        text = text_lib.TextConfig.from_dict(dict(d.pop("text", {}) or {}))
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"model: unknown fields {unknown} for the contrastive stage")
        if "trainable" in d:
            d["trainable"] = tuple(d["trainable"])
        return cls(vision=vision, text=text, **d)

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate("model.text")
        if self.embed_dim <= 0:
            raise ValueError(f"model.embed_dim must be positive, got {self.embed_dim}")
        if not 0 < self.init_inverse_temperature <= self.max_inverse_temperature:
            raise ValueError(
                f"model.init_inverse_temperature={self.init_inverse_temperature} must be in "
                f"(0, model.max_inverse_temperature={self.max_inverse_temperature}]"
            )
        for name in ("dtype", "param_dtype", "frozen_param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"model.{name}: {getattr(self, name)!r} is not float32/bfloat16/float16")
        if self.remat not in stacking.REMAT_POLICIES:
            raise ValueError(f"model.remat: {self.remat!r}; choose one of {sorted(stacking.REMAT_POLICIES)}")
        for p in self.trainable:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"model.trainable: bad regex {p!r}: {e}") from e


def _l2_normalise(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class ContrastiveModel(nnx.Module):
    def __init__(self, cfg: ContrastiveConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.vision = vision_tower(
            cfg.vision, dtype=dtype, param_dtype=pdtype, attention=cfg.attention, remat=cfg.remat, rngs=rngs
        )
        self.text = text_lib.TextEncoder(cfg.text, dtype=dtype, param_dtype=pdtype, remat=cfg.remat, rngs=rngs)
        kw = dict(use_bias=False, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.vision_proj = layers.DenseGeneral(cfg.vision.feature_dim(), cfg.embed_dim, ("vision_embed", None), **kw)
        self.text_proj = layers.DenseGeneral(cfg.text.dim, cfg.embed_dim, ("embed", None), **kw)
        init = math.log(cfg.init_inverse_temperature)
        self.log_inverse_temperature = layers.param(rngs, nnx.initializers.constant(init), (), (), jnp.float32)
        vision_paths = [path_str(("vision", *p)) for p, _ in nnx.to_flat_state(nnx.state(self.vision, nnx.Param))]
        self.vision_trains = any(re.fullmatch(p, vp) for p in cfg.trainable for vp in vision_paths)

    def inverse_temperature(self) -> Array:
        return jnp.minimum(jnp.exp(self.log_inverse_temperature[...]), self.cfg.max_inverse_temperature)

    def embed_images(self, images: Array, *, rng: Array | None = None) -> Array:
        """images [B, H, W, 3] (uint8, or float in [0, 1]) -> L2-normalised embeddings [B, embed_dim] (float32).
        `rng`: a training step's key, for an NFNet's stochastic depth while it trains."""
        x = images.astype(jnp.float32)
        if images.dtype == jnp.uint8:
            x = x / 255.0
        x = sharding.constrain(x, ("batch", None, None, None))
        x = ((x - jnp.asarray(self.cfg.vision.mean)) / jnp.asarray(self.cfg.vision.std)).astype(self.cfg.dtype)
        if isinstance(self.vision, nfnet.NFNet):
            train = rng is not None and self.vision_trains
            grid = self.vision.features(x, train=train, rng=rng if train else None)
            pooled = jnp.mean(grid.astype(jnp.float32), axis=(1, 2))  # global average pool, as NFNet's head does
        else:
            pooled = self.vision.pooled(x)
        return _l2_normalise(self.vision_proj(pooled))

    def embed_text(self, ids: Array, mask: Array) -> Array:
        """ids, mask [B, L] -> L2-normalised embeddings [B, embed_dim] (float32)."""
        return _l2_normalise(self.text_proj(self.text.pooled(ids, mask)))

    def __call__(
        self, images: Array, ids: Array, mask: Array, *, rng: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """(image embeddings, text embeddings, inverse temperature)."""
        return self.embed_images(images, rng=rng), self.embed_text(ids, mask), self.inverse_temperature()


def contrastive_loss(image_emb: Array, text_emb: Array, scale: Array, row_mask: Array) -> Array:
    """Per-pair loss [N]: the mean of image->text and text->image InfoNCE, every other pair of the global batch a
    negative. Rows with `row_mask` 0 (padding, undecodable records) are neither anchors (their loss is 0) nor
    negatives. Each direction's logits keep their rows on the batch's shards; the other side is gathered whole."""
    valid = row_mask > 0
    everywhere = lambda x: sharding.constrain(x, (None, None))
    by_rows = lambda x: sharding.constrain(x, ("batch", None))
    # Masked negatives; finite, so that a batch with no valid row has zero gradients rather than NaNs.
    col_bias = jnp.where(valid, 0.0, -1e9)[None, :]
    i2t = by_rows(scale * image_emb @ everywhere(text_emb).T) + col_bias
    t2i = by_rows(scale * text_emb @ everywhere(image_emb).T) + col_bias
    positive = scale * jnp.sum(image_emb * text_emb, axis=-1)
    loss_i2t = jax.nn.logsumexp(i2t, axis=-1) - positive
    loss_t2i = jax.nn.logsumexp(t2i, axis=-1) - positive
    return jnp.where(valid, 0.5 * (loss_i2t + loss_t2i), 0.0)
