"""BERT-style bidirectional text encoder: the text tower of the stage-1 contrastive (CLIP/ALIGN-style) pretraining.

Architecture of HF `BertModel` with `norm='post'`: token + learned absolute position + token-type embeddings, a
LayerNorm on their sum, then layers that add each sub-block's output to the residual *before* normalising
(`x = LN(x + attn(x)); x = LN(x + mlp(x))`). `norm='pre'` gives the pre-norm variant instead (no embedding
LayerNorm, `x += attn(LN(x))`, a final LayerNorm), which trains more stably from scratch at depth.

The layers are stacked (leading `layers` dim) and scanned. The width is `embed` (this tower is trained, so it is
FSDP-sharded like the LM), attention dims `heads`/`head_dim`, the MLP hidden dim `mlp`, the token table
`vocab` x `embed`, the position table `length`, and the tiny token-type table `added_vocab` (replicated).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import attention, layers, stacking

Array = jax.Array

_TOKEN_AXES = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30522
    num_layers: int = 12
    dim: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 512  # learned absolute positions
    type_vocab_size: int = 2  # BERT token-type embeddings (all ids 0 when not given); 0 = none
    norm: str = "post"  # 'post' (BERT) | 'pre' (pre-norm blocks + final LayerNorm, embeddings not normed)
    norm_eps: float = 1e-12
    activation: str = "gelu"  # layers.ACTIVATIONS names (BERT: exact gelu)
    pool: str = "cls"  # 'cls': BERT pooler tanh(dense(h[:, 0])) | 'mean': masked mean of the final hidden states

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self, prefix: str = "model.text") -> None:
        for name in ("vocab_size", "num_layers", "dim", "num_heads", "mlp_dim", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{prefix}.{name} must be positive, got {getattr(self, name)}")
        if self.type_vocab_size < 0:
            raise ValueError(f"{prefix}.type_vocab_size must be >= 0 (0: no token types), got {self.type_vocab_size}")
        if self.norm_eps <= 0:
            raise ValueError(f"{prefix}.norm_eps must be positive, got {self.norm_eps}")
        if self.dim % self.num_heads:
            raise ValueError(f"{prefix}.num_heads={self.num_heads} must divide dim={self.dim}")
        if self.norm not in ("post", "pre"):
            raise ValueError(f"{prefix}.norm must be 'post' or 'pre', got {self.norm!r}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"{prefix}.pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.activation not in layers.ACTIVATIONS:
            raise ValueError(
                f"{prefix}.activation {self.activation!r} is unknown; choose one of {sorted(layers.ACTIVATIONS)}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model.text: unknown fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class TextBlock(nnx.Module):
    """One encoder layer, post-norm (`x = ln1(x + attn(x)); x = ln2(x + mlp(x))`) or pre-norm; biases everywhere."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        d, h, hd = cfg.dim, cfg.num_heads, cfg.head_dim
        norm = dict(eps=cfg.norm_eps, axis_name="embed", param_dtype=param_dtype, rngs=rngs)
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = layers.LayerNorm(d, **norm)
        self.q = layers.DenseGeneral(d, (h, hd), ("embed", "heads", "head_dim"), **kw)
        self.k = layers.DenseGeneral(d, (h, hd), ("embed", "heads", "head_dim"), **kw)
        self.v = layers.DenseGeneral(d, (h, hd), ("embed", "heads", "head_dim"), **kw)
        self.o = layers.DenseGeneral((h, hd), d, ("heads", "head_dim", "embed"), **kw)
        self.mlp_norm = layers.LayerNorm(d, **norm)
        self.fc1 = layers.DenseGeneral(d, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.fc2 = layers.DenseGeneral(cfg.mlp_dim, d, ("mlp", "embed"), **kw)
        self.act = layers.activation(cfg.activation)
        self.pre_norm = cfg.norm == "pre"

    def _attn(self, y: Array, mask: Array) -> Array:
        q = sharding.constrain(self.q(y), ("batch", "length", "heads", "head_dim"))
        return self.o(attention.dot_product_attention(q, self.k(y), self.v(y), mask=mask))

    def _mlp(self, y: Array) -> Array:
        h = sharding.constrain(self.act(self.fc1(y)), ("batch", "length", "mlp"))
        return self.fc2(h)

    def __call__(self, x: Array, mask: Array) -> Array:
        if self.pre_norm:
            x = x + self._attn(self.attn_norm(x), mask)
            x = x + self._mlp(self.mlp_norm(x))
        else:
            x = self.attn_norm(x + self._attn(x, mask))
            x = self.mlp_norm(x + self._mlp(x))
        return sharding.constrain(x, _TOKEN_AXES)


class TextEncoder(nnx.Module):
    """Bidirectional text tower: `__call__` gives per-token states (HF `last_hidden_state`), `pooled` one vector."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        cfg.validate()
        if remat not in stacking.REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(stacking.REMAT_POLICIES)}")
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        d = cfg.dim
        init = nnx.initializers.normal(0.02)  # BERT's embedding init
        self.token_embed = layers.param(rngs, init, (cfg.vocab_size, d), ("vocab", "embed"), param_dtype)
        self.pos_embed = layers.param(rngs, init, (cfg.max_len, d), ("length", "embed"), param_dtype)
        self.type_embed = (
            layers.param(rngs, init, (cfg.type_vocab_size, d), ("added_vocab", "embed"), param_dtype)
            if cfg.type_vocab_size
            else None
        )
        norm = dict(eps=cfg.norm_eps, axis_name="embed", param_dtype=param_dtype, rngs=rngs)
        self.embed_norm = layers.LayerNorm(d, **norm) if cfg.norm == "post" else None
        self.layers = stacking.stack(
            lambda r: TextBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_layers, rngs
        )
        self.final_norm = layers.LayerNorm(d, **norm) if cfg.norm == "pre" else None
        self.pooler = (
            layers.DenseGeneral(
                d, d, ("embed", "embed"), use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            if cfg.pool == "cls"
            else None
        )

    def _embed(self, ids: Array, token_types: Array | None) -> Array:
        length = ids.shape[1]
        if length > self.cfg.max_len:
            # Learned positions exist only up to max_len; indexing past them would silently clamp.
            raise ValueError(f"text of {length} tokens is longer than model.text.max_len={self.cfg.max_len}")
        # Gather the `embed` shards of the table first, as the LM's embedding does: rows looked up from an
        # embed-sharded table come out embed-sharded, which XLA can only fix by replicating the activation.
        table = sharding.constrain(self.token_embed[...], ("vocab", None))
        x = jnp.take(table, ids, axis=0).astype(self.dtype)
        x = x + self.pos_embed[:length].astype(self.dtype)
        if self.type_embed is not None:
            types = jnp.zeros_like(ids) if token_types is None else token_types
            x = x + jnp.take(self.type_embed[...], types, axis=0).astype(self.dtype)
        elif token_types is not None:
            raise ValueError("token_types given, but model.text.type_vocab_size=0")
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return sharding.constrain(x, _TOKEN_AXES)

    def __call__(self, ids: Array, mask: Array, token_types: Array | None = None) -> Array:
        """ids int [B, L], mask bool/int [B, L] (True = real token; padding keys are masked out of attention) ->
        final hidden states [B, L, dim] (HF last_hidden_state). Padded positions' states are not meaningful."""
        x = self._embed(ids, token_types)
        key_mask = mask.astype(bool)[:, None, None, :]  # [B, 1 head, 1 query, L keys]
        graphdef, state = nnx.split(self.layers)
        x, _ = stacking.scan(lambda layer, h, _: (layer(h, key_mask), None), graphdef, state, x, remat=self.remat)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def pooled(self, ids: Array, mask: Array, token_types: Array | None = None) -> Array:
        """[B, dim]: HF pooler_output for pool='cls'; masked mean for 'mean'."""
        h = self(ids, mask, token_types)
        if self.pooler is not None:
            out = jnp.tanh(self.pooler(h[:, 0]))
        else:
            w = mask.astype(jnp.float32)[..., None]
            # An all-padding row pools to zeros rather than NaN.
            out = (h.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
            out = out.astype(h.dtype)
        return sharding.constrain(out, ("batch", "embed"))
