import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from flamingo_jax import sharding
from flamingo_jax.models import lm as lm_lib
from tests import numpy_ref as ref
from tests.models.helpers import randomize

SMALL = dict(vocab_size=40, num_layers=3, dim=16, num_heads=4, head_dim=4, mlp_dim=24, max_len=32)


def _model(family: str, **kw) -> lm_lib.DecoderLM:
    cfg = lm_lib.LMConfig.from_dict(dict(SMALL, family=family, **kw))
    m = lm_lib.DecoderLM(cfg, rngs=nnx.Rngs(0))
    randomize(m, 1, scale=0.3)
    return m


def _reference_llama(p: dict, ids: np.ndarray, cfg: lm_lib.LMConfig) -> np.ndarray:
    """LLaMA-style forward in float64 NumPy: RMSNorm, rotary (half split), GQA, SwiGLU, untied head."""
    emb = np.concatenate([p["embed"]["base"], p["embed"]["added"]])
    h = emb[ids]
    length = ids.shape[1]
    inv = cfg.rope_theta ** (-np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    ang = np.arange(length)[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rot(x):
        half = x.shape[-1] // 2
        return x * cos[None, :, None] + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin[None, :, None]

    for i in range(cfg.num_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
        x = ref.rms_norm(h, lp["attn_norm"]["scale"], cfg.norm_eps)
        q, k, v = (ref.dense(x, lp["attn"][n]["kernel"]) for n in "qkv")
        a = ref.attention(rot(q), rot(k), v, mask=np.tril(np.ones((length, length), bool)))
        h = h + ref.dense(a, lp["attn"]["o"]["kernel"], n_in=2)
        x = ref.rms_norm(h, lp["mlp_norm"]["scale"], cfg.norm_eps)
        g = ref.dense(x, lp["mlp"]["gate"]["kernel"])
        up = ref.dense(x, lp["mlp"]["up"]["kernel"])
        h = h + ref.dense(g / (1 + np.exp(-g)) * up, lp["mlp"]["down"]["kernel"])
    h = ref.rms_norm(h, p["final_norm"]["scale"], cfg.norm_eps)
    return np.concatenate([h @ p["head"]["base"], h @ p["head"]["added"]], -1)


def test_llama_gqa_matches_float64_reference():
    m = _model("llama", num_kv_heads=2)
    ids = np.random.default_rng(0).integers(0, 43, (2, 9))
    got, _ = m(jnp.asarray(ids))
    p = ref.to64(nnx.to_pure_dict(nnx.state(m)))
    want = _reference_llama(p, ids, m.cfg)
    assert got.shape == (2, 9, 43)
    assert np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)) < 1e-5


@pytest.mark.parametrize("family,kw", [("llama", dict(num_kv_heads=2)), ("gpt2", {}), ("chinchilla", {})])
def test_kv_cache_decoding_matches_full_forward(family, kw):
    m = _model(family, **kw)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 43, (2, 10)))
    full, _ = m(ids)
    cache = m.init_cache(2, 16)
    chunks = []
    for lo, hi in [(0, 6), (6, 7), (7, 8), (8, 10)]:
        logits, cache = m(ids[:, lo:hi], cache=cache)
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, 1), full, atol=2e-5, rtol=2e-5)


def test_left_padded_prompt_matches_unpadded():
    m = _model("llama")
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 40, (1, 5)))
    want, _ = m(ids)
    padded = jnp.concatenate([jnp.full((1, 3), 42), ids], axis=1)
    mask = jnp.arange(8)[None] >= 3
    got, cache = m(padded, token_mask=mask, cache=m.init_cache(1, 12))
    np.testing.assert_allclose(got[:, 3:], want, atol=2e-5, rtol=2e-5)
    # The next token continues at position 5, unaffected by the padding.
    nxt = jnp.array([[7]])
    step, _ = m(nxt, cache=cache)
    full, _ = m(jnp.concatenate([ids, nxt], 1))
    np.testing.assert_allclose(step[:, 0], full[:, -1], atol=2e-5, rtol=2e-5)


def test_added_token_rows_are_separate_parameters():
    m = _model("gpt2")
    ids = jnp.array([[1, 40, 41, 42]])  # base token, then the three added ones
    grads = nnx.grad(lambda mm: jnp.sum(mm(ids)[0][:, :, 0]))(m)
    g_added = np.asarray(grads["embed"]["added"][...])
    assert np.all(np.abs(g_added).sum(-1) > 0)
    assert np.count_nonzero(np.abs(np.asarray(grads["embed"]["base"][...])).sum(-1)) >= 1


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        lm_lib.LMConfig.from_dict(dict(SMALL, num_kv_heads=3)).validate()
    with pytest.raises(ValueError, match="family"):
        lm_lib.LMConfig.from_dict(dict(SMALL, family="bert"))


LLAMA3 = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)


def test_rope_scaling_is_normalised_hashable_and_survives_json():
    cfg = lm_lib.LMConfig.from_dict(dict(SMALL, family="llama", rope_scaling=dict(LLAMA3)))
    assert cfg.rope_scaling == tuple(sorted(LLAMA3.items()))
    hash(cfg)  # an lru_cache key
    back = lm_lib.LMConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg and hash(back) == hash(cfg)
    assert lm_lib.LMConfig.from_dict(dict(SMALL, rope_scaling={"rope_type": "default"})).rope_scaling == ()
    cfg.validate("model.lm")


@pytest.mark.parametrize(
    "scaling, match",
    [
        (dict(rope_type="longrope", factor=2.0), r"model\.lm\.rope_scaling: rope_type 'longrope' .*supported"),
        (dict(rope_type="dynamic", factor=2.0), r"model\.lm\.rope_scaling: rope_type 'dynamic'.*sequence length"),
        (dict(factor=2.0), r"model\.lm\.rope_scaling needs a rope_type"),
        (dict(rope_type="yarn", factor=2.0), r"model\.lm\.rope_scaling: .*'yarn' needs \['original_max_position"),
        (dict(LLAMA3, rope_theta=1e4), r"model\.lm\.rope_scaling: keys \['rope_theta'\].*model\.lm\.rope_theta"),
        (dict(LLAMA3, high_freq_factor=0.5), r"model\.lm\.rope_scaling: llama3 needs high_freq_factor"),
        (dict(rope_type="linear", factor="2"), r"model\.lm\.rope_scaling\.factor must be a number"),
        ("linear", r"model\.lm\.rope_scaling must be a dict"),
    ],
)
def test_invalid_rope_scaling_names_the_field(scaling, match):
    with pytest.raises(ValueError, match=match):
        lm_lib.LMConfig.from_dict(dict(SMALL, rope_scaling=scaling)).validate("model.lm")


def test_llama3_scaling_keeps_high_divides_low_and_smooths_middle_frequencies():
    from flamingo_jax.models import rope

    # head_dim 8, theta 1e4: wavelengths 2*pi*(1, 10, 100, 1000) against bands 64/4 = 16 and 64/1 = 64.
    inv, attention_factor = rope.inverse_frequencies(
        8, 1e4, tuple(dict(LLAMA3, original_max_position_embeddings=64).items())
    )
    smooth = (64 / (2 * np.pi * 10) - 1) / 3
    want = [1.0, (1 - smooth) * 0.1 / 8 + smooth * 0.1, 0.01 / 8, 0.001 / 8]
    np.testing.assert_allclose(inv, want, rtol=1e-12)
    assert attention_factor == 1.0

    plain = _numpy_model(lm_lib.LMConfig.from_dict(dict(SMALL, num_kv_heads=2)), 3)
    scaled = nnx.merge(
        nnx.graphdef(_numpy_model(dataclasses.replace(plain.cfg, rope_scaling=LLAMA3), 0)), nnx.state(plain)
    )
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 43, (2, 24)))
    a, b = (np.asarray(nnx.jit(lambda mm, x: mm(x)[0])(mm, ids)) for mm in (plain, scaled))
    np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-5)  # position 0 rotates by nothing either way
    assert np.max(np.abs(a[:, 16:] - b[:, 16:])) > 1e-3


# 8 query heads, 2 key/value heads: fewer kv heads than the 4 tensor shards (LLaMA-70B: 8 on 16).
GQA = dict(vocab_size=40, num_layers=2, dim=32, num_heads=8, num_kv_heads=2, head_dim=4, mlp_dim=32, max_len=32)


def _numpy_model(cfg: lm_lib.LMConfig, seed: int) -> lm_lib.DecoderLM:
    """A DecoderLM with random NumPy weights (as `randomize`): no per-op compiles of an eager init."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: lm_lib.DecoderLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(
        lambda x: jnp.asarray((0.3 * rng.standard_normal(x.shape) + (x.ndim == 1)).astype(x.dtype)), state
    )
    return nnx.merge(graphdef, state)


def _sharded(m: lm_lib.DecoderLM, mesh):
    graphdef, state = nnx.split(m)
    shardings = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
    return graphdef, jax.device_put(state, shardings)


def test_fewer_kv_heads_than_tensor_shards_replicate_kv_and_match_one_device(capfd):
    m = _numpy_model(lm_lib.LMConfig.from_dict(dict(GQA, qkv_bias=True)), 4)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 43, (2, 10)))
    graphdef, single = nnx.split(m)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[0])
    step = jax.jit(lambda st, x, c: nnx.merge(graphdef, st)(x, cache=c))
    want = forward(single, ids)

    mesh = sharding.make_mesh((1, 2, 4))
    _, state = _sharded(m, mesh)
    attn = state["layers"]["attn"]
    # q heads split over tensor; k/v (kernel and bias) whole on every tensor rank, embed still over fsdp.
    assert attn["q"]["kernel"][...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert attn["q"]["bias"][...].sharding.spec == P(None, "tensor", None)
    for x in "kv":
        assert attn[x]["kernel"][...].sharding.spec == P(None, "fsdp", None, None)
        assert attn[x]["bias"][...].sharding.spec == P(None, None, None)
        assert attn[x]["kernel"][...].addressable_shards[0].data.shape == (2, 16, 2, 4)
    capfd.readouterr()
    with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
        compiled = forward.lower(state, ids).compile()
        hlo, got = compiled.as_text(), compiled(state, ids)
        cache, chunks = m.init_cache(2, 16), []
        for lo, hi in [(0, 5), (5, 10)]:  # one compile; the second chunk attends to the cached first
            logits, cache = step(state, ids[:, lo:hi], cache)
            chunks.append(logits)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.concatenate(chunks, 1), np.asarray(want), atol=2e-5, rtol=2e-5)
    # Per device, the attention scores cover 1 of the 2 sequences (fsdp) and 8 / 4 = 2 query heads (tensor).
    scores = [s for s in re.findall(r"f32\[([\d,]+),10,10\]", hlo) if "," in s]
    assert scores and {math.prod(map(int, s.split(","))) for s in scores} == {2}, scores


def test_other_indivisible_parameter_dims_still_fail_by_name():
    mesh = sharding.make_mesh((1, 2, 4))
    for field, value, what in [
        ("mlp_dim", 30, r"mlp/\w+/kernel: dim \d \(mlp\)"),
        ("num_heads", 6, r"attn/[qo]/kernel: dim \d \(heads\)"),
    ]:
        cfg = lm_lib.LMConfig.from_dict(dict(GQA, **{field: value}))
        abstract = nnx.eval_shape(lambda cfg=cfg: lm_lib.DecoderLM(cfg, rngs=nnx.Rngs(0)))
        with pytest.raises(sharding.ShardingError, match=rf"parameter layers/{what}.*config\.model\.lm\.{field}"):
            sharding.state_shardings(nnx.state(abstract), mesh, sharding.DEFAULT_RULES)
