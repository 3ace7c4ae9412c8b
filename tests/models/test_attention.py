import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import attention, rope
from tests import numpy_ref as ref


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_masked_gqa_attention_matches_float64(kv_heads):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(kv_heads), 4)
    q = jax.random.normal(k1, (2, 5, 4, 8))
    k = jax.random.normal(k2, (2, 7, kv_heads, 8))
    v = jax.random.normal(k3, (2, 7, kv_heads, 8))
    mask = jax.random.bernoulli(k4, 0.6, (2, 1, 5, 7)).at[..., 0].set(True)
    got = attention.dot_product_attention(q, k, v, mask=mask)
    want = ref.attention(*(np.asarray(a, np.float64) for a in (q, k, v)), mask=np.asarray(mask))
    assert np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)) < 1e-5


def test_causal_equals_explicit_lower_triangular_mask():
    q, k, v = (jax.random.normal(kk, (1, 6, 2, 4)) for kk in jax.random.split(jax.random.key(0), 3))
    causal = attention.dot_product_attention(q, k, v, is_causal=True)
    want = ref.attention(*(np.asarray(a, np.float64) for a in (q, k, v)), mask=np.tril(np.ones((6, 6), bool)))
    assert np.max(np.abs(np.asarray(causal) - want)) < 1e-5


def test_rotary_matches_complex_rotation_and_preserves_relative_scores():
    hd, theta = 8, 10000.0
    x = np.asarray(jax.random.normal(jax.random.key(1), (1, 5, 2, hd)), np.float64)
    pos = np.arange(5)[None]
    cos, sin = rope.rotary_tables(jnp.asarray(pos), hd, theta)
    got = np.asarray(rope.apply_rotary(jnp.asarray(x, jnp.float32), cos, sin), np.float64)
    # Half-split layout: pair (i, i + hd/2) rotates by angle pos * theta^(-2i/hd).
    freqs = theta ** (-np.arange(0, hd, 2) / hd)
    z = (x[..., : hd // 2] + 1j * x[..., hd // 2 :]) * np.exp(1j * pos[..., None, None] * freqs)
    want = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # q.k after rotation depends only on the position difference.
    shifted = rope.rotary_tables(jnp.asarray(pos + 7), hd, theta)
    q1 = np.asarray(rope.apply_rotary(jnp.asarray(x, jnp.float32), cos, sin))
    q2 = np.asarray(rope.apply_rotary(jnp.asarray(x, jnp.float32), *shifted))
    s1 = np.einsum("blhd,bmhd->bhlm", q1, q1)
    s2 = np.einsum("blhd,bmhd->bhlm", q2, q2)
    np.testing.assert_allclose(s1, s2, atol=1e-4)
