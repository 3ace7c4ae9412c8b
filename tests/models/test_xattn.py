import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax.models import xattn
from tests import numpy_ref as ref
from tests.models.helpers import randomize

IMG = 100  # the <image> id in these tests


def _reference_media_index(ids: np.ndarray, link_next: np.ndarray | None = None) -> np.ndarray:
    """Per token, by scanning: the last <image> at or before it (or, linked to next, the first at or after)."""
    out = np.full(ids.shape, -1)
    for b in range(ids.shape[0]):
        positions = [i for i, t in enumerate(ids[b]) if t == IMG]
        for lpos in range(ids.shape[1]):
            if link_next is not None and link_next[b]:
                after = [j for j, p in enumerate(positions) if p >= lpos]
                out[b, lpos] = after[0] if after else -1
            else:
                before = [j for j, p in enumerate(positions) if p <= lpos]
                out[b, lpos] = before[-1] if before else -1
    return out


def test_media_index_matches_definition():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10, (4, 20))
    ids[rng.random(ids.shape) < 0.2] = IMG
    ids[0, :] = 3  # a row with no image
    link = np.array([False, True, False, True])
    np.testing.assert_array_equal(xattn.media_index(jnp.asarray(ids), IMG), _reference_media_index(ids))
    got = xattn.media_index(jnp.asarray(ids), IMG, link_next=jnp.asarray(link), num_media=10)
    np.testing.assert_array_equal(got, _reference_media_index(ids, link))
    # Only 2 media slots: tokens linked to a third image or later see nothing.
    want = _reference_media_index(ids, link)
    want[link[:, None] & (want >= 2) | (want >= 2) & ~link[:, None]] = -1
    got2 = np.asarray(xattn.media_index(jnp.asarray(ids), IMG, link_next=jnp.asarray(link), num_media=2))
    np.testing.assert_array_equal(got2[link], want[link])


def _block(seed: int = 0) -> xattn.GatedCrossAttention:
    m = xattn.GatedCrossAttention(16, 12, num_heads=2, head_dim=8, ffw_mult=2, rngs=nnx.Rngs(seed))
    randomize(m, seed + 1)
    return m


def _reference(p: dict, y: np.ndarray, visual: np.ndarray, idx: np.ndarray) -> np.ndarray:
    b, n, m, dv = visual.shape
    q = ref.dense(ref.layer_norm(y, p["attn_norm"]["scale"], p["attn_norm"]["bias"]), p["q"]["kernel"])
    kv = visual.reshape(b, n * m, dv)
    k, v = ref.dense(kv, p["k"]["kernel"]), ref.dense(kv, p["v"]["kernel"])
    out = np.zeros(q.shape)
    for bi in range(b):
        for t in range(y.shape[1]):
            if idx[bi, t] < 0:
                continue  # sees no image: exactly zero
            sl = slice(idx[bi, t] * m, (idx[bi, t] + 1) * m)
            out[bi, t : t + 1] = ref.attention(q[bi : bi + 1, t : t + 1], k[bi : bi + 1, sl], v[bi : bi + 1, sl])[0]
    y = y + np.tanh(p["attn_gate"]) * ref.dense(out, p["o"]["kernel"], n_in=2)
    h = ref.layer_norm(y, p["ffw_norm"]["scale"], p["ffw_norm"]["bias"])
    ffw = ref.dense(ref.squared_relu(ref.dense(h, p["ffw"]["up"]["kernel"])), p["ffw"]["down"]["kernel"])
    return y + np.tanh(p["ffw_gate"]) * ffw


def test_matches_float64_reference_with_masking():
    blk = _block()
    ids = np.array([[1, 2, IMG, 3, 4, IMG, 5, 6], [IMG, 1, 2, 3, IMG, IMG, 4, 5]])
    idx = np.asarray(xattn.media_index(jnp.asarray(ids), IMG))
    y = np.asarray(jax.random.normal(jax.random.key(5), (2, 8, 16)))
    visual = np.asarray(jax.random.normal(jax.random.key(6), (2, 3, 4, 12)))
    got = np.asarray(blk(jnp.asarray(y), jnp.asarray(visual), jnp.asarray(idx)), np.float64)
    want = _reference(ref.to64(nnx.to_pure_dict(nnx.state(blk))), y.astype(np.float64), visual.astype(np.float64), idx)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


def test_tokens_before_any_image_get_exactly_zero_cross_attention():
    blk = _block(3)
    # Attention-only view: zero the FFW gate so the block's change is the cross-attention output itself.
    blk.ffw_gate[...] = jnp.zeros(())
    ids = jnp.array([[1, 2, 3, IMG, 4]])
    idx = xattn.media_index(ids, IMG)
    y = jax.random.normal(jax.random.key(1), (1, 5, 16))
    visual = jax.random.normal(jax.random.key(2), (1, 2, 4, 12))
    out = blk(y, visual, idx)
    np.testing.assert_array_equal(np.asarray(out[:, :3]), np.asarray(y[:, :3]))  # bitwise: exactly zero added
    assert np.abs(np.asarray(out[:, 3:] - y[:, 3:])).min() > 0


def test_zero_gates_are_identity():
    blk = xattn.GatedCrossAttention(16, 12, num_heads=2, head_dim=8, rngs=nnx.Rngs(0))
    y = jax.random.normal(jax.random.key(1), (2, 6, 16))
    visual = jax.random.normal(jax.random.key(2), (2, 2, 4, 12))
    idx = jnp.zeros((2, 6), jnp.int32)
    np.testing.assert_array_equal(np.asarray(blk(y, visual, idx)), np.asarray(y))


def test_attention_mask_never_leaves_a_row_empty():
    # A fully masked row is NaN in cuDNN flash attention's backward; rows that see no image allow every key
    # instead (their output is zeroed), rows that see image k allow exactly image k's tokens.
    rng = np.random.default_rng(4)
    ids = np.where(rng.random((3, 40)) < 0.1, IMG, rng.integers(0, 50, (3, 40)))
    ids[:, :5] = 1
    idx = xattn.media_index(jnp.asarray(ids), IMG, num_media=3)
    mask = np.asarray(xattn.media_attention_mask(idx, 3, 4))[:, 0]
    assert mask.any(-1).all()
    idx = np.asarray(idx)
    for b, t in zip(*np.nonzero(idx >= 0)):
        np.testing.assert_array_equal(np.nonzero(mask[b, t])[0], np.arange(4) + 4 * idx[b, t])
    assert mask[idx < 0].all()


def test_gradients_finite_and_zero_for_tokens_before_any_image():
    blk = _block(5)
    ids = jnp.array([[1, 2, 3, IMG, 4, 5]])
    idx = xattn.media_index(ids, IMG)
    y = jax.random.normal(jax.random.key(1), (1, 6, 16))
    visual = jax.random.normal(jax.random.key(2), (1, 1, 4, 12))

    blk.ffw_gate[...] = jnp.zeros(())

    def attn_out(y, visual):  # the cross-attention contribution alone, on the tokens before the image
        return jnp.sum((blk(y, visual, idx) - y)[:, :3] ** 2)

    gy, gv = jax.grad(attn_out, argnums=(0, 1))(y, visual)
    assert np.isfinite(np.asarray(gy)).all() and np.isfinite(np.asarray(gv)).all()
    np.testing.assert_array_equal(np.asarray(gv), 0.0)  # tokens 0-2 see no image: no gradient reaches it
