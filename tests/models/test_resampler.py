import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax.models import resampler
from tests import numpy_ref as ref
from tests.models.helpers import randomize


def _reference(p: dict, x: np.ndarray, num_layers: int) -> np.ndarray:
    b, t, s, d = x.shape
    time = p["time_embed"]
    if t > time.shape[0]:
        src = np.linspace(0, time.shape[0] - 1, t)
        time = np.stack([np.interp(src, np.arange(time.shape[0]), time[:, j]) for j in range(d)], axis=1)
    x = (x + time[:t][None, :, None, :]).reshape(b, t * s, d)
    lat = np.broadcast_to(p["latents"], (b, *p["latents"].shape)).copy()
    for i in range(num_layers):
        lp = {k: {kk: vv[i] for kk, vv in v.items()} for k, v in p["layers"].items()}
        ln_l = ref.layer_norm(lat, lp["latent_norm"]["scale"], lp["latent_norm"]["bias"])
        ln_x = ref.layer_norm(x, lp["media_norm"]["scale"], lp["media_norm"]["bias"])
        kv = np.concatenate([ln_x, ln_l], axis=1)
        q = ref.dense(ln_l, lp["q"]["kernel"])
        k, v = ref.dense(kv, lp["k"]["kernel"]), ref.dense(kv, lp["v"]["kernel"])
        lat = lat + ref.dense(ref.attention(q, k, v), lp["o"]["kernel"], n_in=2)
        h = ref.layer_norm(lat, lp["ffw_norm"]["scale"], lp["ffw_norm"]["bias"])
        lat = lat + ref.dense(ref.squared_relu(ref.dense(h, lp["ffw_up"]["kernel"])), lp["ffw_down"]["kernel"])
    return ref.layer_norm(lat, p["final_norm"]["scale"], p["final_norm"]["bias"])


def _model(**kw) -> resampler.PerceiverResampler:
    args = dict(num_layers=2, num_latents=5, num_heads=3, head_dim=4, ffw_mult=2, max_frames=4)
    args.update(kw)
    m = resampler.PerceiverResampler(12, rngs=nnx.Rngs(0), **args)
    randomize(m, 1)
    return m


def test_matches_float64_reference_video():
    m = _model()
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 3, 7, 12)))
    got = np.asarray(m(jnp.asarray(x)), np.float64)
    want = _reference(ref.to64(nnx.to_pure_dict(nnx.state(m))), x.astype(np.float64), 2)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


def test_more_frames_than_time_embeddings_interpolates():
    m = _model(max_frames=3)
    x = np.asarray(jax.random.normal(jax.random.key(3), (1, 7, 4, 12)))
    got = np.asarray(m(jnp.asarray(x)), np.float64)
    want = _reference(ref.to64(nnx.to_pure_dict(nnx.state(m))), x.astype(np.float64), 2)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5
    # The interpolated table starts and ends at the learned first and last rows.
    table = np.asarray(m.time_embed[...])
    interp = np.asarray(resampler.interpolate_time_embeddings(jnp.asarray(table), 7))
    np.testing.assert_allclose(interp[[0, -1]], table[[0, -1]], rtol=1e-6)


def test_fixed_number_of_tokens_whatever_the_grid():
    m = _model()
    for shape in [(2, 1, 1, 12), (2, 1, 100, 12), (2, 4, 9, 12), (2, 9, 9, 12)]:
        assert m(jnp.ones(shape)).shape == (2, 5, 12)
