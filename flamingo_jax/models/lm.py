"""Decoder-only language models: Chinchilla-, LLaMA- and GPT-2-style, with a key/value cache.

One module covers the three families; a family is a set of defaults for `LMConfig` (norm, MLP, positions,
biases, tying). The vocabulary is the pretrained one plus `num_added_tokens` rows (`<image>`,
`<|endofchunk|>`, `<pad>`) kept in separate parameters, so freezing the LM can leave exactly those rows trainable.

Layers are stacked and scanned. Flamingo inserts its GATED XATTN-DENSE blocks through `CrossAttentionHook`:
the layers are then scanned in groups of `every`, each group preceded by one hook block.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import attention, layers, stacking
from flamingo_jax.models import rope as rope_lib

Array = jax.Array

FAMILIES: dict[str, dict[str, Any]] = {
    # Chinchilla: pre-norm RMSNorm, GELU FFN 4x, relative positions (rotary here), untied embeddings.
    "chinchilla": dict(
        norm="rms", norm_eps=1e-6, mlp_act="gelu", gated_mlp=False, positions="rope", tie_embeddings=False
    ),
    # LLaMA/Qwen2/Mistral: RMSNorm, SwiGLU, RoPE, grouped-query attention (Qwen2 adds q/k/v biases).
    "llama": dict(norm="rms", norm_eps=1e-5, mlp_act="silu", gated_mlp=True, positions="rope", tie_embeddings=False),
    # GPT-2: learned positions, LayerNorm with bias, tanh-GELU, biases everywhere, tied embeddings.
    "gpt2": dict(
        norm="layer",
        norm_eps=1e-5,
        mlp_act="gelu_tanh",
        gated_mlp=False,
        positions="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
    ),
}


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    num_layers: int
    dim: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    num_kv_heads: int = 0  # 0: same as num_heads (no GQA)
    family: str = "llama"
    norm: str = "rms"
    norm_eps: float = 1e-6
    mlp_act: str = "silu"
    gated_mlp: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    positions: str = "rope"
    rope_theta: float = 10000.0
    # RoPE scaling as sorted (key, value) pairs with Hugging Face's key names (a dict is accepted and normalised):
    # rope_type 'linear', 'llama3' or 'yarn' and its parameters; () is plain RoPE. See models/rope.py.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_len: int = 2048
    tie_embeddings: bool = False
    num_added_tokens: int = 3
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # Hashable whatever the source: a dict from a config file, lists of pairs from JSON (export's config.json).
        object.__setattr__(self, "rope_scaling", rope_lib.normalise_scaling(self.rope_scaling))

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def total_vocab(self) -> int:
        return self.vocab_size + self.num_added_tokens

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        """Family defaults, overridden by every field given explicitly."""
        d = dict(d)
        family = d.get("family", "llama")
        if family not in FAMILIES:
            raise ValueError(f"lm.family: unknown family {family!r}; choose one of {sorted(FAMILIES)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"lm: unknown fields {unknown}")
        return cls(**{**FAMILIES[family], **d})

    def validate(self, prefix: str = "lm") -> None:
        positive = ("vocab_size", "num_layers", "dim", "num_heads", "head_dim", "mlp_dim", "max_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{prefix}.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"{prefix}.num_kv_heads={self.kv_heads} must divide num_heads={self.num_heads}")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"{prefix}.positions must be 'rope' or 'learned', got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"{prefix}.head_dim={self.head_dim} must be even for rotary positions")
        if self.rope_scaling and self.positions != "rope":
            raise ValueError(f"{prefix}.rope_scaling is set, but {prefix}.positions={self.positions!r} is not 'rope'")
        rope_lib.validate_scaling(self.rope_scaling, f"{prefix}.rope_scaling")
        layers.activation(self.mlp_act)


class Embedding(nnx.Module):
    """Pretrained rows `base` [vocab, embed] plus added rows `added` [num_added, embed]."""

    def __init__(self, cfg: LMConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        self.vocab_size = cfg.vocab_size
        self.base = layers.param(rngs, init, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), param_dtype)
        self.added = layers.param(rngs, init, (cfg.num_added_tokens, cfg.dim), ("added_vocab", "embed"), param_dtype)

    def __call__(self, ids: Array, dtype: jnp.dtype) -> Array:
        # A gather per table instead of concatenating them: no copy of a [vocab, embed] matrix per step, and
        # the added rows receive gradient only from the added ids.
        # Gather the tables' `embed` shards first, as FSDP does for every weight: rows looked up from an
        # embed-sharded table come out embed-sharded, and XLA can only make them batch-sharded by replicating the
        # whole activation (its "involuntary full rematerialization" warning).
        table = sharding.constrain(self.base[...], ("vocab", None))
        extra = sharding.constrain(self.added[...], ("added_vocab", None))
        is_base = ids < self.vocab_size
        base = jnp.take(table, jnp.where(is_base, ids, 0), axis=0)
        added = jnp.take(extra, jnp.where(is_base, 0, ids - self.vocab_size), axis=0)
        out = jnp.where(is_base[..., None], base, added).astype(dtype)
        return sharding.constrain(out, ("batch", "length", "embed"))

    def attend(self, h: Array) -> Array:
        """Tied output projection, logits in float32."""
        dims = (((h.ndim - 1,), (1,)), ((), ()))
        f32 = jnp.float32
        base = jax.lax.dot_general(h, self.base[...].astype(h.dtype), dims, preferred_element_type=f32)
        added = jax.lax.dot_general(h, self.added[...].astype(h.dtype), dims, preferred_element_type=f32)
        return jnp.concatenate([base, added], axis=-1)


class OutputHead(nnx.Module):
    """Untied output projection: pretrained columns `base` [embed, vocab] plus `added` [embed, num_added]."""

    def __init__(self, cfg: LMConfig, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(1.0 / math.sqrt(cfg.dim))
        self.base = layers.param(rngs, init, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), param_dtype)
        self.added = layers.param(rngs, init, (cfg.dim, cfg.num_added_tokens), ("embed", "added_vocab"), param_dtype)

    def __call__(self, h: Array) -> Array:
        dims = (((h.ndim - 1,), (0,)), ((), ()))
        f32 = jnp.float32
        base = jax.lax.dot_general(h, self.base[...].astype(h.dtype), dims, preferred_element_type=f32)
        added = jax.lax.dot_general(h, self.added[...].astype(h.dtype), dims, preferred_element_type=f32)
        return jnp.concatenate([base, added], axis=-1)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: LMConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, attention_impl: str, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=nnx.initializers.normal(cfg.init_std))
        h, kvh, hd, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.dim
        self.q = layers.DenseGeneral(d, (h, hd), ("embed", "heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
        self.k = layers.DenseGeneral(d, (kvh, hd), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
        self.v = layers.DenseGeneral(d, (kvh, hd), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, **kw)
        self.o = layers.DenseGeneral((h, hd), d, ("heads", "head_dim", "embed"), use_bias=cfg.out_bias, **kw)
        self.attention_impl = attention_impl

    def __call__(
        self,
        x: Array,
        rope: tuple[Array, Array] | None,
        cache: dict[str, Array] | None,
    ) -> tuple[Array, dict[str, Array] | None]:
        q, k, v = self.q(x), self.k(x), self.v(x)
        q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"))
        if rope is not None:
            q, k = rope_lib.apply_rotary(q, *rope), rope_lib.apply_rotary(k, *rope)
        if cache is None:
            out = attention.dot_product_attention(q, k, v, is_causal=True, implementation=self.attention_impl)
        else:
            # Write this chunk at slot `end`; a query at slot end+i sees valid slots <= end+i.
            end = cache["end"]
            k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), end, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), end, axis=1)
            slots = jnp.arange(k_all.shape[1])
            causal = slots[None, :] <= end + jnp.arange(q.shape[1])[:, None]
            mask = causal[None, None] & cache["valid"][:, None, None, :]
            out = attention.dot_product_attention(
                q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask=mask, implementation="xla"
            )
            cache = dict(cache, k=k_all, v=v_all)
        return self.o(out), cache


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: LMConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, attention_impl: str, rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = layers.make_norm(cfg.norm, cfg.dim, **norm)
        self.attn = SelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)
        self.mlp_norm = layers.make_norm(cfg.norm, cfg.dim, **norm)
        self.mlp = layers.FeedForward(
            cfg.dim,
            cfg.mlp_dim,
            act=cfg.mlp_act,
            gated=cfg.gated_mlp,
            use_bias=cfg.mlp_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        h: Array,
        rope: tuple[Array, Array] | None,
        cache: dict[str, Array] | None,
    ) -> tuple[Array, dict[str, Array] | None]:
        a, cache = self.attn(self.attn_norm(h), rope, cache)
        h = h + a
        h = h + self.mlp(self.mlp_norm(h))
        return sharding.constrain(h, ("batch", "length", "embed")), cache


@dataclasses.dataclass
class CrossAttentionHook:
    """Blocks run before every `every`-th LM layer (before layers 0, every, 2*every, ...).

    `blocks` is a stacked module with ceil(num_layers / every) entries; `apply(block, h, token_slice)` returns the
    new hidden state (it closes over the visual tokens and the per-token media index).
    """

    blocks: nnx.Module
    every: int
    apply: Callable[[nnx.Module, Array], Array]


class DecoderLM(nnx.Module):
    def __init__(
        self,
        cfg: LMConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        attention_impl: str = "xla",
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        cfg.validate()
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.embed = Embedding(cfg, param_dtype=param_dtype, rngs=rngs)
        if cfg.positions == "learned":
            self.pos_embed = layers.param(
                rngs,
                nnx.initializers.normal(cfg.init_std),
                (cfg.max_len, cfg.dim),
                ("length", "embed"),
                param_dtype,
            )
        self.layers = stacking.stack(
            lambda r: DecoderBlock(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=r),
            cfg.num_layers,
            rngs,
        )
        self.final_norm = layers.make_norm(cfg.norm, cfg.dim, eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.head = None if cfg.tie_embeddings else OutputHead(cfg, param_dtype=param_dtype, rngs=rngs)

    # -- cache -----------------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> dict[str, Array]:
        cfg = self.cfg
        shape = (cfg.num_layers, batch, max_len, cfg.kv_heads, cfg.head_dim)
        dtype = dtype or self.dtype
        return dict(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            end=jnp.zeros((), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
        )

    # -- forward ---------------------------------------------------------------------------------------------
    def __call__(
        self,
        ids: Array,
        *,
        token_mask: Array | None = None,
        cache: dict[str, Array] | None = None,
        hook: CrossAttentionHook | None = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        """Logits [B, L, vocab + added] in float32, and the updated cache (None without one).

        `token_mask` [B, L] marks real tokens: with a cache, padded prompt positions are never attended and do
        not advance positions (left-padded batched generation). Training needs neither.
        """
        cfg = self.cfg
        b, length = ids.shape
        if token_mask is None:
            token_mask = jnp.ones((b, length), bool)
        if cache is None:
            positions = jnp.broadcast_to(jnp.arange(length), (b, length))
        else:
            positions = cache["next_pos"][:, None] + jnp.cumsum(token_mask, axis=1) - 1
            positions = jnp.maximum(positions, 0)
        h = self.embed(ids, self.dtype)
        if cfg.positions == "learned":
            h = h + jnp.take(self.pos_embed[...], jnp.minimum(positions, cfg.max_len - 1), axis=0).astype(h.dtype)
        h = sharding.constrain(h, ("batch", "length", "embed"))
        rope = None
        if cfg.positions == "rope":
            rope = rope_lib.rotary_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

        layer_cache = None
        if cache is not None:
            valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], token_mask, cache["end"], axis=1)
            layer_cache = dict(k=cache["k"], v=cache["v"])
            shared = dict(valid=valid, end=cache["end"])
        else:
            shared = {}
        h, layer_cache = self._run_layers(h, rope, layer_cache, shared, hook)
        if cache is not None:
            cache = dict(
                k=layer_cache["k"],
                v=layer_cache["v"],
                valid=shared["valid"],
                end=cache["end"] + length,
                next_pos=cache["next_pos"] + jnp.sum(token_mask, axis=1, dtype=jnp.int32),
            )
        h = self.final_norm(h)
        logits = self.embed.attend(h) if self.head is None else self.head(h)
        return sharding.constrain(logits, ("batch", "length", "vocab")), cache

    def _run_layers(
        self, h: Array, rope: Any, layer_cache: dict | None, shared: dict, hook: CrossAttentionHook | None
    ) -> tuple[Array, dict | None]:
        graphdef, state = nnx.split(self.layers)
        n = self.cfg.num_layers

        def layer_body(layer: DecoderBlock, h: Array, c: dict | None) -> tuple[Array, dict | None]:
            h, c = layer(h, rope, None if c is None else {**c, **shared})
            return h, None if c is None else dict(k=c["k"], v=c["v"])

        def run(h: Array, st: nnx.State, c: dict | None) -> tuple[Array, dict | None]:
            return stacking.scan(layer_body, graphdef, st, h, c, remat=self.remat)

        if hook is None:
            return run(h, state, layer_cache)

        # Groups of `every` layers, each preceded by one hook block; a shorter last group if `every` does not
        # divide the depth (80 layers, every 7th: 11 groups of 7, then 1 of 3).
        every = hook.every
        full, rem = divmod(n, every)
        hook_graphdef, hook_state = nnx.split(hook.blocks)

        def apply_hook(block_state: nnx.State, h: Array) -> Array:
            return hook.apply(nnx.merge(hook_graphdef, block_state), h)

        if self.remat != "none":
            # Per block, like the layers; no remat around a whole group, which would recompute layers twice.
            apply_hook = jax.checkpoint(apply_hook, policy=stacking.REMAT_POLICIES[self.remat], prevent_cse=False)

        def group(st: nnx.State, c: dict | None, h: Array, block_state: nnx.State):
            return run(apply_hook(block_state, h), st, c)

        def regroup(tree: Any, start: int, stop: int, groups: int | None) -> Any:
            def f(x: Array) -> Array:
                x = x[start:stop]
                return x if groups is None else x.reshape(groups, every, *x.shape[1:])

            return jax.tree.map(f, tree)

        caches = []
        if full:

            def outer(h: Array, xs: tuple) -> tuple[Array, Any]:
                st, block_state, c = xs
                return group(st, c, h, block_state)

            xs = (
                regroup(state, 0, full * every, full),
                regroup(hook_state, 0, full, None),
                None if layer_cache is None else regroup(layer_cache, 0, full * every, full),
            )
            h, c = jax.lax.scan(outer, h, xs)
            if c is not None:
                caches.append(jax.tree.map(lambda x: x.reshape(full * every, *x.shape[2:]), c))
        if rem:
            h, c = group(
                regroup(state, full * every, n, None),
                None if layer_cache is None else regroup(layer_cache, full * every, n, None),
                h,
                jax.tree.map(lambda x: x[full], hook_state),
            )
            if c is not None:
                caches.append(c)
        if layer_cache is None:
            return h, None
        return h, jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *caches)
