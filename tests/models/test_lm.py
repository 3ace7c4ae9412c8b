import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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
