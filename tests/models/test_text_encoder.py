"""The BERT-style text encoder: float64 reference, padding invariance, variants, config errors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from flamingo_jax import sharding
from flamingo_jax.models import text_encoder as te
from tests import numpy_ref as ref
from tests.models.helpers import randomize

TINY = te.TextConfig(vocab_size=50, num_layers=2, dim=32, num_heads=4, mlp_dim=64, max_len=16, norm_eps=1e-6)


def _model(cfg: te.TextConfig = TINY, seed: int = 1) -> te.TextEncoder:
    m = te.TextEncoder(cfg, rngs=nnx.Rngs(0))
    randomize(m, seed, scale=0.2)
    return m


def _inputs(seed: int, batch: int = 3, length: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ids and token types; a padding mask with a different number of real tokens (>= 2) per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY.vocab_size, (batch, length))
    lens = rng.integers(2, length + 1, batch)
    lens[0] = length  # one row without padding
    mask = np.arange(length)[None] < lens[:, None]
    types = rng.integers(0, TINY.type_vocab_size, (batch, length))
    return ids, mask, types


def _reference(p: dict, cfg: te.TextConfig, ids, mask, types) -> tuple[np.ndarray, np.ndarray]:
    """(hidden states, pooled) in float64 NumPy from the parameter dict, BERT's equations written out."""
    gelu = lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    ln = lambda x, q: ref.layer_norm(x, q["scale"], q["bias"], cfg.norm_eps)
    length = ids.shape[1]
    h = p["token_embed"][ids] + p["pos_embed"][:length][None] + p["type_embed"][types]
    if cfg.norm == "post":
        h = ln(h, p["embed_norm"])
    key_mask = mask[:, None, None, :]
    for i in range(cfg.num_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])

        def attn(x, lp=lp):
            q, k, v = (ref.dense(x, lp[n]["kernel"], lp[n]["bias"]) for n in "qkv")
            return ref.dense(ref.attention(q, k, v, mask=key_mask), lp["o"]["kernel"], lp["o"]["bias"], n_in=2)

        def mlp(x, lp=lp):
            return ref.dense(
                gelu(ref.dense(x, lp["fc1"]["kernel"], lp["fc1"]["bias"])), lp["fc2"]["kernel"], lp["fc2"]["bias"]
            )

        if cfg.norm == "post":
            h = ln(h + attn(h), lp["attn_norm"])
            h = ln(h + mlp(h), lp["mlp_norm"])
        else:
            h = h + attn(ln(h, lp["attn_norm"]))
            h = h + mlp(ln(h, lp["mlp_norm"]))
    if cfg.norm == "pre":
        h = ln(h, p["final_norm"])
    if cfg.pool == "cls":
        pooled = np.tanh(h[:, 0] @ p["pooler"]["kernel"] + p["pooler"]["bias"])
    else:
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return h, pooled


@pytest.mark.parametrize("norm,pool", [("post", "cls"), ("pre", "mean")])
def test_matches_float64_reference(norm, pool):
    cfg = dataclasses.replace(TINY, norm=norm, pool=pool)
    m = _model(cfg)
    ids, mask, types = _inputs(0)
    p = ref.to64(nnx.to_pure_dict(nnx.state(m)))
    want_h, want_pooled = _reference(p, cfg, ids, mask, types)
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    got_h, got_pooled = np.asarray(m(*args)), np.asarray(m.pooled(*args))
    assert got_h.shape == (3, 9, 32) and got_pooled.shape == (3, 32)
    assert np.abs(want_h).max() > 0.2 and np.abs(want_pooled).max() > 0.1  # not a vacuous comparison
    np.testing.assert_allclose(got_h, want_h, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_pooled, want_pooled, atol=1e-5, rtol=0)


def test_shapes_and_default_token_types():
    m = _model()
    ids, mask, types = _inputs(1, batch=2, length=11)
    h = m(jnp.asarray(ids), jnp.asarray(mask.astype(np.int32)))  # int masks are accepted
    assert h.shape == (2, 11, 32) and h.dtype == jnp.float32
    assert m.pooled(jnp.asarray(ids), jnp.asarray(mask)).shape == (2, 32)
    # token_types=None means all zeros, and the type embedding is used: other ids change the output.
    zeros = m(jnp.asarray(ids), jnp.asarray(mask), jnp.zeros_like(jnp.asarray(ids)))
    np.testing.assert_array_equal(np.asarray(h), np.asarray(zeros))
    assert not np.allclose(np.asarray(m(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))), np.asarray(h))
    with pytest.raises(ValueError, match="max_len=16"):
        m(jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 17), bool))


@pytest.mark.parametrize("norm,pool", [("post", "cls"), ("pre", "mean")])
def test_padding_invariance(norm, pool):
    m = _model(dataclasses.replace(TINY, norm=norm, pool=pool))
    ids, mask, types = _inputs(2)
    other = np.where(mask, ids, np.random.default_rng(3).integers(0, TINY.vocab_size, ids.shape))
    assert (other != ids).any()
    run = lambda x: (
        np.asarray(m(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(types))),
        np.asarray(m.pooled(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(types))),
    )
    (h1, p1), (h2, p2) = run(ids), run(other)
    np.testing.assert_allclose(h2[mask], h1[mask], atol=1e-6, rtol=0)
    np.testing.assert_allclose(p2, p1, atol=1e-6, rtol=0)
    assert not np.allclose(h2[~mask], h1[~mask])  # the padded positions did change
    # ... and a real token's id matters.
    real = ids.copy()
    real[1, 1] = (real[1, 1] + 1) % TINY.vocab_size
    assert not np.allclose(run(real)[0][1][mask[1]], h1[1][mask[1]])


def test_variants_differ_in_params_and_outputs():
    post, pre = _model(), _model(dataclasses.replace(TINY, norm="pre"))
    mean = te.TextEncoder(dataclasses.replace(TINY, pool="mean"), rngs=nnx.Rngs(0))
    weights = nnx.to_pure_dict(nnx.state(post))
    del weights["pooler"]
    state = nnx.state(mean)
    nnx.replace_by_pure_dict(state, weights)
    nnx.update(mean, state)
    assert post.embed_norm is not None and post.final_norm is None and post.pooler is not None
    assert pre.embed_norm is None and pre.final_norm is not None
    assert mean.pooler is None and "pooler" not in nnx.to_pure_dict(nnx.state(mean))
    ids, mask, types = (jnp.asarray(a) for a in _inputs(4))
    assert not np.allclose(np.asarray(post(ids, mask, types)), np.asarray(pre(ids, mask, types)), atol=1e-3)
    # Same weights apart from the pooler: identical hidden states, different pooled vectors.
    np.testing.assert_array_equal(np.asarray(post(ids, mask, types)), np.asarray(mean(ids, mask, types)))
    assert not np.allclose(np.asarray(post.pooled(ids, mask, types)), np.asarray(mean.pooled(ids, mask, types)))


def test_no_token_types():
    m = _model(dataclasses.replace(TINY, type_vocab_size=0))
    assert m.type_embed is None
    ids, mask, types = (jnp.asarray(a) for a in _inputs(5))
    assert m(ids, mask).shape == (3, 9, 32)
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        m(ids, mask, types)


def test_remat_and_bfloat16_run():
    cfg = dataclasses.replace(TINY, pool="mean")
    ids, mask, types = (jnp.asarray(a) for a in _inputs(6))
    f32 = _model(cfg)
    bf16 = te.TextEncoder(cfg, dtype=jnp.bfloat16, remat="full", rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(f32))
    want = np.asarray(f32.pooled(ids, mask, types))

    def loss(model):
        return jnp.sum(model.pooled(ids, mask, types).astype(jnp.float32) ** 2)

    grads = nnx.grad(loss)(bf16)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))
    got = np.asarray(bf16.pooled(ids, mask, types), np.float32)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_params_shard_under_default_rules():
    m = te.TextEncoder(dataclasses.replace(TINY, vocab_size=48), rngs=nnx.Rngs(0))
    shard = sharding.state_shardings(nnx.state(m), sharding.make_mesh((1, 2, 4)), sharding.DEFAULT_RULES)
    assert shard["layers"]["q"]["kernel"].get_value().spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert shard["token_embed"].get_value().spec == jax.sharding.PartitionSpec("tensor", "fsdp")


@pytest.mark.parametrize(
    "field,value",
    [
        ("vocab_size", 0),
        ("num_layers", -1),
        ("dim", 0),
        ("mlp_dim", 0),
        ("max_len", 0),
        ("type_vocab_size", -1),
        ("num_heads", 5),
        ("norm", "sandwich"),
        ("pool", "max"),
        ("activation", "swish9"),
    ],
)
def test_validate_names_the_field(field, value):
    cfg = dataclasses.replace(TINY, **{field: value})
    with pytest.raises(ValueError, match=rf"model\.text\.{field}"):
        cfg.validate()
    with pytest.raises(ValueError, match=rf"text\.{field}"):
        te.TextEncoder(cfg, rngs=nnx.Rngs(0))


def test_from_dict():
    assert te.TextConfig.from_dict(dict(dim=64, num_heads=2)) == te.TextConfig(dim=64, num_heads=2)
    with pytest.raises(ValueError, match=r"\['bogus', 'hidden'\]"):
        te.TextConfig.from_dict(dict(dim=64, bogus=1, hidden=2))
