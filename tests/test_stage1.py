"""Stage 1: the two-way InfoNCE loss against float64 NumPy, sharded == single device, the trainable temperature,
the dataset-combining strategies, and the config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax import sharding, train, train_step
from flamingo_jax.models.contrastive import contrastive_loss
from tests.configs import VOCAB, tiny_contrastive_config


def numpy_infonce(img, txt, scale, mask):
    """Per-pair (i2t + t2i) / 2 in float64, invalid rows dropped from the batch entirely."""
    keep = mask > 0
    img, txt = img[keep].astype(np.float64), txt[keep].astype(np.float64)
    logits = scale * img @ txt.T

    def ce(lg):
        m = lg.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(lg - m).sum(axis=1, keepdims=True)))[:, 0]
        return lse - np.diag(lg)

    out = np.zeros(len(mask))
    out[keep] = 0.5 * (ce(logits) + ce(logits.T))
    return out


def unit(rng, shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_infonce_matches_float64_numpy_with_masked_rows():
    rng = np.random.default_rng(1)
    img, txt = unit(rng, (12, 7)), unit(rng, (12, 7))
    txt[:4] = unit(rng, (4, 7)) * 0.3 + img[:4] * 0.7  # some aligned pairs: losses of several sizes
    txt[:4] /= np.linalg.norm(txt[:4], axis=-1, keepdims=True)
    mask = (rng.random(12) > 0.25).astype(np.float32)
    mask[0] = 1.0
    got = contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(13.7), jnp.asarray(mask))
    want = numpy_infonce(img, txt, 13.7, mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[mask == 0] == 0)


def make_pairs(config, seed=0):
    rng = np.random.default_rng(seed)
    s = config.model.vision.image_size
    out = {}
    for name, ds in config.data.datasets.items():
        b, length = ds.batch_size, ds.seq_len
        lengths = rng.integers(3, length + 1, b)
        mask = np.arange(length)[None] < lengths[:, None]
        out[name] = dict(
            media=rng.integers(0, 256, (b, 1, 1, s, s, 3), dtype=np.uint8),
            text=np.where(mask, rng.integers(1, VOCAB, (b, length)), 0).astype(np.int32),
            text_mask=mask,
            row_mask=(rng.random(b) > 0.1).astype(np.float32),
        )
    return out


def setup(config, mesh_shape):
    mcfg = train.validate(config)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    tr = train.build(config, mcfg, mesh)
    state, frozen = train.init_state(tr)
    return tr, state, frozen


_COMPILED: dict = {}


def grads(tr, state, frozen, batches, strategy="accumulate"):
    """(gradients, metrics) of the stage-1 mixture objective, jitted once per trainer and strategy."""
    weights = {m: float(ds.weight) for m, ds in tr.config.data.datasets.items()}
    micro = {m: 1 for m in weights}
    if (id(tr), strategy) not in _COMPILED:

        def f(params, frozen, batches):
            with sharding.use_mesh_rules(tr.mesh, tr.rules):
                return train_step.mixture_grads(
                    tr.parts, params, frozen, batches, weights, micro, strategy, objective="contrastive"
                )

        _COMPILED[id(tr), strategy] = jax.jit(f)
    glob = {m: train.to_global(b, tr) for m, b in batches.items()}
    return jax.device_get(_COMPILED[id(tr), strategy](state["params"], frozen, glob))


@pytest.fixture(scope="module")
def trainers():
    """The tiny stage-1 trainer (unequal lambdas, so that merged weighting shows) on 1 device and on (2, 4, 1)."""
    config = tiny_contrastive_config()
    config.data.datasets.align.weight = 0.6
    return {shape: setup(config, shape) for shape in ((1, 1, 1), (2, 4, 1))}


@pytest.mark.parametrize("strategy", ["accumulate", "merged"])
def test_sharded_loss_and_gradients_equal_single_device(trainers, strategy):
    batches = make_pairs(trainers[(1, 1, 1)][0].config)
    one = grads(*trainers[(1, 1, 1)], batches, strategy)
    eight = grads(*trainers[(2, 4, 1)], batches, strategy)  # the batch split over data x fsdp
    for k in one[1]:
        np.testing.assert_allclose(eight[1][k], one[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
    flat1, flat8 = jax.tree.leaves_with_path(one[0]), jax.tree.leaves(eight[0])
    # Gradients are sums in another order (the embedding's scatter-add, the batch reductions): equal up to float32
    # rounding relative to the gradient's scale (a key bias's gradient is zero up to rounding).
    scale = max(float(np.max(np.abs(a))) for _, a in flat1)
    for (path, a), b in zip(flat1, flat8):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))


def test_temperature_is_trained_and_merged_is_one_weighted_batch(trainers):
    tr, state, frozen = trainers[(1, 1, 1)]
    batches = make_pairs(tr.config, seed=3)
    g, metrics = grads(tr, state, frozen, batches, "accumulate")
    assert abs(float(g["log_inverse_temperature"])) > 1e-6
    assert np.all(np.isfinite(np.asarray(g["log_inverse_temperature"])))

    # merged: one loss over the concatenated pairs, every pair weighted by its dataset's lambda.
    _, merged = grads(tr, state, frozen, batches, "merged")
    embed = jax.jit(lambda p, b: tr.parts.merge(p, frozen)(b["media"][:, 0, 0], b["text"], b["text_mask"]))
    cat = {k: np.concatenate([batches[m][k] for m in ("ltip", "align")]) for k in batches["ltip"]}
    img, txt, scale = embed(state["params"], cat)
    per = numpy_infonce(np.asarray(img), np.asarray(txt), float(scale), cat["row_mask"])
    w = np.concatenate([batches["ltip"]["row_mask"] * 0.2, batches["align"]["row_mask"] * 0.6])
    np.testing.assert_allclose(merged["train/loss"], (per * w).sum() / w.sum(), rtol=1e-5)
    # accumulate: each dataset's own batch (its own negatives), lambda-weighted sum of per-pair means.
    want = 0.0
    for m, lam in (("ltip", 0.2), ("align", 0.6)):
        b = batches[m]
        img, txt, _ = embed(state["params"], b)
        per = numpy_infonce(np.asarray(img), np.asarray(txt), float(scale), b["row_mask"])
        want += lam * per.sum() / b["row_mask"].sum()
    np.testing.assert_allclose(metrics["train/loss"], want, rtol=1e-5)


def test_bad_stage1_configs_fail_naming_the_field():
    c = tiny_contrastive_config()
    c.data.datasets.ltip.micro_batches = 2
    with pytest.raises(ValueError, match=r"datasets.ltip.micro_batches=2: a contrastive loss does not split"):
        train.validate(c)
    c = tiny_contrastive_config()
    c.data.datasets.ltip.kind = "interleaved"
    with pytest.raises(ValueError, match=r"datasets.ltip.kind='interleaved': the contrastive stage"):
        train.validate(c)
    c = tiny_contrastive_config()
    c.data.datasets.ltip.seq_len = 40
    with pytest.raises(ValueError, match=r"seq_len=40 exceeds model.text.max_len=16"):
        train.validate(c)
    c = tiny_contrastive_config()
    c.model.init_inverse_temperature = 500.0
    with pytest.raises(ValueError, match=r"model\.init_inverse_temperature"):
        train.validate(c)
    c = tiny_contrastive_config()
    c.stage = "contrastve"
    with pytest.raises(ValueError, match=r"config\.stage"):
        train.validate(c)
