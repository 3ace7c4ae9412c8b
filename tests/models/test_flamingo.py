import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flamingo_jax import config as config_lib
from flamingo_jax import train_step
from flamingo_jax.models import flamingo
from tests.models.helpers import randomize

ROOT = pathlib.Path(__file__).resolve().parents[2]
V = 50  # base vocab; <image> = 50


def tiny_config(**over) -> flamingo.FlamingoConfig:
    d = dict(
        vision=dict(
            variant=None,
            widths=(16, 16, 32, 32),
            depths=(1, 1, 1, 1),
            stem_widths=(4, 8, 8),
            group_size=8,
            image_size=32,
        ),
        resampler=dict(num_layers=1, num_latents=3, num_heads=2, head_dim=8, max_frames=2),
        xattn=dict(every=2, num_heads=2, head_dim=8, ffw_mult=2),
        lm=dict(family="llama", vocab_size=V, num_layers=3, dim=16, num_heads=2, head_dim=8, mlp_dim=32),
    )
    d.update(over)
    return flamingo.FlamingoConfig.from_dict(d)


@pytest.fixture(scope="module")
def model() -> flamingo.Flamingo:
    return flamingo.Flamingo(tiny_config(), rngs=nnx.Rngs(0))


def _inputs(seed: int, batch: int = 2, n_media: int = 3, length: int = 12):
    rng = np.random.default_rng(seed)
    media = rng.integers(0, 256, (batch, n_media, 1, 32, 32, 3), dtype=np.uint8)
    ids = rng.integers(0, V, (batch, length))
    ids[:, [2, 6, 9]] = V  # three <image> tokens per row
    return jnp.asarray(media), jnp.asarray(ids)


def test_initial_logits_equal_frozen_lm_exactly(model):
    media, ids = _inputs(0)
    got = model(media, ids)
    want, _ = model.lm(ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    other = model(jnp.asarray(np.random.default_rng(9).integers(0, 256, media.shape, dtype=np.uint8)), ids)
    np.testing.assert_array_equal(np.asarray(other), np.asarray(want))


@pytest.fixture(scope="module")
def trained_like(model) -> flamingo.Flamingo:
    """The tiny model with every parameter (gates included) randomised, as after some training."""
    m = nnx.clone(model)
    randomize(m, 3, scale=0.3)
    return m


def test_changing_image_k_changes_only_tokens_from_its_image_token_on(trained_like):
    media, ids = _inputs(1)
    base = np.asarray(trained_like(media, ids))
    for k, pos in enumerate([2, 6, 9]):
        changed = media.at[:, k].set(255 - media[:, k])
        out = np.asarray(trained_like(changed, ids))
        np.testing.assert_array_equal(out[:, :pos], base[:, :pos])  # before image k's <image>: bitwise same
        assert np.abs(out[:, pos:] - base[:, pos:]).max() > 1e-4  # from it on: the image matters


def test_tokens_before_first_image_unaffected_by_every_image(trained_like):
    media, ids = _inputs(2)
    base = np.asarray(trained_like(media, ids))
    out = np.asarray(
        trained_like(jnp.asarray(np.random.default_rng(5).integers(0, 256, media.shape, dtype=np.uint8)), ids)
    )
    np.testing.assert_array_equal(out[:, :2], base[:, :2])


def test_padding_with_empty_media_slots_changes_nothing(trained_like):
    media, ids = _inputs(3)
    base = np.asarray(trained_like(media, ids))
    padded = jnp.concatenate([media, jnp.zeros((2, 2, *media.shape[2:]), media.dtype)], axis=1)
    np.testing.assert_allclose(np.asarray(trained_like(padded, ids)), base, rtol=1e-6, atol=1e-6)


def test_link_next_sees_following_image(trained_like):
    media, ids = _inputs(4)
    link = jnp.array([True, True])
    base = np.asarray(trained_like(media, ids, link_next=link))
    changed = media.at[:, 1].set(255 - media[:, 1])  # image 1 (<image> at 6) now conditions tokens 3..6
    out = np.asarray(trained_like(changed, ids, link_next=link))
    np.testing.assert_array_equal(out[:, :3], base[:, :3])  # tokens 0..2 are linked to image 0
    assert np.abs(out[:, 3:7] - base[:, 3:7]).max() > 1e-4


def test_cached_decoding_matches_full_forward(trained_like):
    media, ids = _inputs(5)
    full = np.asarray(trained_like(media, ids))
    visual = trained_like.encode_media(media)
    cache = trained_like.init_cache(2, 16)
    outs = []
    for lo, hi in [(0, 4), (4, 7), (7, 8), (8, 12)]:
        logits, cache = trained_like.decode(visual, ids[:, lo:hi], cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def vision_trains(trained_like) -> flamingo.Flamingo:
    """`trained_like` with the vision encoder trainable (NFNet: stochastic depth at its default rate 0.1)."""
    cfg = dataclasses.replace(trained_like.cfg, trainable=(*flamingo.DEFAULT_TRAINABLE, "vision/.*"))
    m = flamingo.Flamingo(cfg, rngs=nnx.Rngs(0))
    nnx.update(m, nnx.state(trained_like, nnx.Param))
    assert m.vision_trains and m.vision.stochdepth_rate > 0
    return m


def test_stochastic_depth_runs_only_with_a_key_and_a_trained_vision_encoder(trained_like, vision_trains):
    media, ids = _inputs(6)  # the other tests' shapes: eager ops already compiled
    # The keys two training steps give one dataset (see flamingo_jax.train_step).
    k0, k1 = (train_step.dataset_key(train_step.step_key(0, s), "m3w") for s in (0, 1))
    # Evaluation and generation (no key) are deterministic: the frozen encoder's output.
    evaluated = np.asarray(trained_like.encode_media(media))
    np.testing.assert_array_equal(np.asarray(vision_trains.encode_media(media)), evaluated)
    # Training mode: a draw per key, reproducible (resume), different between steps.
    t0 = np.asarray(vision_trains.encode_media(media, rng=k0))
    np.testing.assert_array_equal(np.asarray(vision_trains.encode_media(media, rng=k0)), t0)
    t1 = np.asarray(vision_trains.encode_media(media, rng=k1))
    assert np.abs(t0 - evaluated).max() > 1e-4 and np.abs(t1 - t0).max() > 1e-4
    logits = np.asarray(trained_like(media, ids))
    assert np.abs(np.asarray(vision_trains(media, ids, rng=k0)) - logits).max() > 1e-4
    # Frozen encoder: the key is unused, bitwise.
    np.testing.assert_array_equal(np.asarray(trained_like.encode_media(media, rng=k0)), evaluated)
    np.testing.assert_array_equal(np.asarray(trained_like(media, ids, rng=k0)), logits)


def test_trainable_split_and_unmatched_pattern(model):
    tr = nnx.state(model, flamingo.trainable_filter(model.cfg.trainable))
    paths = {flamingo.path_str(p) for p, _ in nnx.to_flat_state(tr)}
    assert paths and all(p.startswith(("resampler/", "xattn/", "lm/embed/added", "lm/head/added")) for p in paths)
    assert any(p.startswith("lm/head/added") for p in paths)
    with pytest.raises(ValueError, match="matches no parameter"):
        flamingo.check_trainable_patterns(model, ("resampler/.*", "xatn/.*"))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("xattn", dict(every=0), "model.xattn.every"),
        (
            "lm",
            dict(
                family="llama",
                vocab_size=V,
                num_layers=2,
                dim=16,
                num_heads=3,
                num_kv_heads=2,
                head_dim=8,
                mlp_dim=32,
            ),
            "model.lm.num_kv_heads",
        ),
        (
            "vision",
            dict(variant=None, widths=(16, 16, 32, 32), depths=(1, 1, 1, 1), group_size=3),
            "model.vision.group_size",
        ),
        ("dtype", "float8", "model.dtype"),
    ],
)
def test_impossible_config_fails_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value}).validate()


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize("name", ["flamingo_3b", "flamingo_9b", "flamingo_80b"])
def test_paper_configs_trace_jitted_forward_without_allocation(name):
    mcfg = config_lib.validate(_load(name))
    abstract = nnx.eval_shape(lambda: flamingo.Flamingo(mcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    media = jax.ShapeDtypeStruct((1, 2, 1, 320, 320, 3), jnp.uint8)
    ids = jax.ShapeDtypeStruct((1, 64), jnp.int32)
    out = jax.eval_shape(jax.jit(lambda s, m, i: nnx.merge(graphdef, s)(m, i)), state, media, ids)
    assert out.shape == (1, 64, mcfg.lm.total_vocab)
    visual = jax.eval_shape(lambda s, m: nnx.merge(graphdef, s).encode_media(m), state, media)
    assert visual.shape == (1, 2, 64, 1536)


def test_params_tool_json_80b():
    out = subprocess.run(
        [sys.executable, "-m", "flamingo_jax.tools.params", "--config=configs/flamingo_80b.py", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(counts) == {"vision", "resampler", "xattn", "lm", "total", "trainable", "frozen"}
    assert all(isinstance(v, int) for v in counts.values())
    assert counts["total"] == counts["vision"] + counts["resampler"] + counts["xattn"] + counts["lm"]
    assert counts["trainable"] + counts["frozen"] == counts["total"]
    assert 60e9 < counts["lm"] < 75e9 and 300e6 < counts["vision"] < 500e6
