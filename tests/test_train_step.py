"""The step: sharded == single device, per-dataset accumulation, frozen weights, non-finite updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax import sharding, train, train_step
from tests.configs import VOCAB, tiny_train_config

IMG = VOCAB  # <image> id


def make_batches(config, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Random batches shaped like the loaders' output, with <image> tokens matching the media slots."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, ds in config.data.datasets.items():
        b, length, n, t = ds.batch_size, ds.seq_len, ds.max_media, ds.frames
        s = config.model.vision.image_size
        tokens = rng.integers(0, VOCAB, (b, length)).astype(np.int32)
        for i in range(n):
            tokens[:, 1 + i * (length // n)] = IMG
        out[name] = dict(
            media=rng.integers(0, 256, (b, n, t, s, s, 3), dtype=np.uint8),
            tokens=tokens,
            targets=np.roll(tokens, -1, 1),
            loss_mask=(rng.random((b, length)) < 0.9).astype(np.float32),
            link_next=rng.random(b) < 0.5,
        )
    return out


def setup(config, mesh_shape, devices=None):
    mcfg = train.validate(config)
    mesh = sharding.make_mesh(mesh_shape, devices)
    tr = train.build(config, mcfg, mesh)
    state, frozen = train.init_state(tr)
    return tr, state, frozen


_COMPILED: dict = {}


def grads_fn(tr, strategy="accumulate", micro=None):
    """Jitted mixture gradient (cached per trainer and settings: compiling dominates these tests)."""
    weights = {m: float(ds.weight) for m, ds in tr.config.data.datasets.items()}
    micro = micro or {m: 1 for m in weights}
    key = (id(tr), strategy, tuple(sorted(micro.items())))
    if key not in _COMPILED:

        def f(params, frozen, batches):
            with sharding.use_mesh_rules(tr.mesh, tr.rules):
                return train_step.mixture_grads(tr.parts, params, frozen, batches, weights, micro, strategy)

        _COMPILED[key] = jax.jit(f)
    return _COMPILED[key]


def grads_and_update_fn(tr):
    """Gradients and the updated state from one compiled program, with the trainer's shardings."""
    key = (id(tr), "update")
    if key not in _COMPILED:
        weights = {m: float(ds.weight) for m, ds in tr.config.data.datasets.items()}

        def f(state, frozen, batches):
            with sharding.use_mesh_rules(tr.mesh, tr.rules):
                g, m = train_step.mixture_grads(
                    tr.parts, state["params"], frozen, batches, weights, {n: 1 for n in weights}
                )
                new, _ = train_step.apply_update(state, g, m["train/loss"], tr.tx)
            return g, new, m

        _COMPILED[key] = jax.jit(
            f,
            in_shardings=(tr.state_shardings, tr.frozen_shardings, None),
            out_shardings=(tr.state_shardings["params"], tr.state_shardings, None),
        )
    return _COMPILED[key]


def tree_rel_err(a, b) -> float:
    """max(|a - b|) over the whole tree, relative to max(|b|) over the whole tree.

    Per leaf, a gradient that is a sum of cancelling terms (a gate's, summed over datasets) is small, and
    float32 reduction-order noise relative to it can reach 1e-4 legitimately; relative to the gradient's
    scale it is ~1e-6.
    """
    la = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    assert [x.shape for x in la] == [x.shape for x in lb]
    scale = max(float(np.max(np.abs(x))) for x in lb)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb)) / max(scale, 1e-30)


def rel_err(a, b) -> float:
    return tree_rel_err(a, b)


@pytest.fixture(scope="module")
def config():
    c = tiny_train_config()
    c.model.trainable = ("resampler/.*", "xattn/.*", "lm/(embed|head)/added")
    # Two datasets keep compile times down; interleaved (several media) and video (frames) differ the most.
    c.data.datasets = {k: v for k, v in c.data.datasets.items() if k in ("m3w", "vtp")}
    return c


@pytest.fixture(scope="module")
def single(config):
    return setup(config, (1, 1, 1), jax.devices()[:1])


def _randomize_gates(state):
    """Non-zero gates, so gradients reach the resampler and the images matter."""

    def f(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return x + 0.5 if name.endswith("_gate") else x

    return dict(state, params=jax.tree_util.tree_map_with_path(f, state["params"]))


def test_sharded_step_equals_single_device(config, single):
    assert jax.device_count() == 8
    tr1, state1, frozen1 = single
    tr8, state8, frozen8 = setup(config, (2, 2, 2))
    batches = make_batches(config)
    state1, state8 = _randomize_gates(state1), _randomize_gates(state8)

    # Same initial values, whatever the layout.
    for a, b in zip(jax.tree.leaves(state1["params"]), jax.tree.leaves(state8["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Shards have the shapes the logical rules imply: e.g. xattn q kernel [layers, embed/fsdp, heads/tensor, hd].
    q = state8["params"]["xattn"]["q"]["kernel"]
    assert q.shape == (2, 16, 2, 8)
    assert {s.data.shape for s in q.addressable_shards} == {(2, 8, 1, 8)}
    emb = frozen8["lm"]["embed"]["base"]
    assert {s.data.shape for s in emb.addressable_shards} == {(VOCAB // 2, 8)}

    g1, new1, m1 = grads_and_update_fn(tr1)(state1, frozen1, {k: train.to_global(v, tr1) for k, v in batches.items()})
    g8, new8, m8 = grads_and_update_fn(tr8)(state8, frozen8, {k: train.to_global(v, tr8) for k, v in batches.items()})
    assert rel_err(m8["train/loss"], m1["train/loss"]) < 1e-5
    assert tree_rel_err(g8, g1) < 1e-5
    assert tree_rel_err(new8["params"], new1["params"]) < 1e-5
    assert tree_rel_err(new8["opt_state"], new1["opt_state"]) < 1e-5
    assert new8["params"]["xattn"]["q"]["kernel"].sharding == q.sharding
    assert g8["xattn"]["q"]["kernel"].sharding == q.sharding


def test_accumulated_gradient_is_weighted_sum_and_micro_batch_invariant(config, single):
    tr, state, frozen = single
    state = _randomize_gates(state)
    batches = {k: train.to_global(v, tr) for k, v in make_batches(config, 1).items()}
    g_all, m_all = grads_fn(tr)(state["params"], frozen, batches)

    # By hand: each dataset alone with weight 1, then weighted by lambda_m and summed.
    hand = None
    for name, ds in config.data.datasets.items():
        g, m = jax.jit(
            lambda p, f, b, name=name: train_step.mixture_grads(tr.parts, p, f, {name: b}, {name: 1.0}, {name: 1})
        )(state["params"], frozen, batches[name])
        np.testing.assert_allclose(m["train/loss"], m_all[f"train/loss/{name}"], rtol=1e-6)
        g = jax.tree.map(lambda x, w=ds.weight: w * x, g)
        hand = g if hand is None else jax.tree.map(jnp.add, hand, g)
    assert tree_rel_err(g_all, hand) < 1e-5
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_all["resampler"])) > 0

    g4, m4 = grads_fn(tr, micro={"m3w": 4, "vtp": 8})(state["params"], frozen, batches)
    np.testing.assert_allclose(m4["train/loss"], m_all["train/loss"], rtol=1e-5)
    assert tree_rel_err(g4, g_all) < 1e-5


@pytest.fixture(scope="module")
def steps(single):
    return train.compile_steps(single[0])[0]


def test_frozen_weights_untouched_and_absent_from_optimizer(config, single, steps):
    tr, state, frozen = single
    before = jax.tree.map(np.asarray, frozen)
    batches = {k: train.to_global(v, tr) for k, v in make_batches(config, 2).items()}
    new_state, metrics = steps["all"](jax.tree.map(jnp.copy, state), frozen, batches)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert bool(jnp.isfinite(metrics["train/loss"]))
    # Every optimiser-state array has the shape of a trainable parameter (or is a scalar counter).
    trainable_shapes = {x.shape for x in jax.tree.leaves(state["params"])}
    frozen_only = {x.shape for x in jax.tree.leaves(frozen)} - trainable_shapes
    for leaf in jax.tree.leaves(new_state["opt_state"]):
        if leaf.ndim:  # scalars (Adam's count) aside, every moment has a trainable parameter's shape
            assert leaf.shape in trainable_shapes and leaf.shape not in frozen_only
    n_opt = sum(x.size for x in jax.tree.leaves(new_state["opt_state"]))
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert n_opt < 2 * n_params + 10  # Adam's two moments of the trainable parameters, nothing frozen


def test_non_finite_update_is_skipped_and_counted(config, single, steps):
    tr, state, frozen = single
    batches = make_batches(config, 3)
    state = _randomize_gates(jax.tree.map(jnp.copy, state))  # the step donates its state: not the fixture's
    params_before = jax.tree.map(np.asarray, state["params"])
    bad = {k: dict(v) for k, v in batches.items()}
    bad["m3w"]["loss_mask"] = np.full_like(bad["m3w"]["loss_mask"], np.nan)
    new, _ = steps["all"](state, frozen, {k: train.to_global(v, tr) for k, v in bad.items()})
    assert int(new["skipped"]) == 1 and int(new["consecutive_skips"]) == 1 and int(new["step"]) == 1
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(params_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    new2, _ = steps["all"](new, frozen, {k: train.to_global(v, tr) for k, v in batches.items()})
    assert int(new2["consecutive_skips"]) == 0 and int(new2["skipped"]) == 1


def test_strategies_differ_as_defined(config, single):
    tr, state, frozen = single
    state = _randomize_gates(state)
    batches = {k: train.to_global(v, tr) for k, v in make_batches(config, 4).items()}
    _, acc = grads_fn(tr, "accumulate")(state["params"], frozen, batches)
    _, merged = grads_fn(tr, "merged")(state["params"], frozen, batches)
    weights = {m: ds.weight for m, ds in config.data.datasets.items()}
    tokens = {m: float(np.sum(np.asarray(batches[m]["loss_mask"]))) for m in weights}
    per = {m: float(acc[f"train/loss/{m}"]) for m in weights}
    want = sum(weights[m] * per[m] * tokens[m] for m in weights) / sum(weights[m] * tokens[m] for m in weights)
    np.testing.assert_allclose(float(merged["train/loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(acc["train/loss"]), sum(weights[m] * per[m] for m in weights), rtol=1e-5)
    with pytest.raises(ValueError, match="strategy"):
        train_step.mixture_grads(tr.parts, state["params"], frozen, batches, weights, {}, "mixed")


# ------------------------------------------------------------------------------------ learning rate and keys
def _fake_nll(parts, params, frozen, batch, rng=None):
    """A stand-in model (compiles in well under a second): its loss draws from the key it is given, as an NFNet's
    stochastic depth does, and is a fixed function of the parameters without one."""
    noise = 1.0 if rng is None else jax.random.normal(rng, params["w"].shape)
    return jnp.sum(batch["loss_mask"]) * jnp.sum(params["w"] * noise)


def _fake_step(monkeypatch, warmup_steps=4, micro=None, seed=0):
    import dataclasses

    import ml_collections

    from flamingo_jax import optim
    from flamingo_jax.config import base_config

    fake = dataclasses.replace(train_step.OBJECTIVES["flamingo"], loss_sum=_fake_nll)
    monkeypatch.setitem(train_step.OBJECTIVES, "flamingo", fake)
    ocfg = ml_collections.ConfigDict(base_config().optimizer.to_dict())
    ocfg.update(lr=1.0, warmup_steps=warmup_steps, schedule="warmup_constant", weight_decay=0.0)
    tx, lr = optim.make(ocfg, 100)
    micro = micro or {"a": 1, "b": 1}
    step = jax.jit(train_step.make_train_step(None, tx, lr, {"a": 1.0, "b": 0.5}, micro, seed=seed))
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    return step, lr, train_step.init_state(params, tx)


def _fake_batches(nan: bool = False):
    mask = np.full((4, 3), np.nan if nan else 1.0, np.float32)
    return {"a": {"loss_mask": mask}, "b": {"loss_mask": np.ones((4, 3), np.float32)}}


def test_logged_lr_is_the_one_applied_after_a_skipped_update(monkeypatch):
    step, lr, state = _fake_step(monkeypatch)  # warmup: lr(0) = 0, lr(1) = 0.25, lr(2) = 0.5, ...
    state, m = step(state, {}, _fake_batches(nan=True))  # forced non-finite: skipped
    assert int(state["skipped"]) == 1 and int(state["step"]) == 1
    assert int(train_step.update_count(state)) == 0  # the optimiser (and its schedule) did not count it
    assert float(m["train/lr"]) == float(lr(0))  # the rate the discarded update would have applied

    # Step 1 applies the schedule at the optimiser's count 0, not at the step's 1: the warmup's 0, so the
    # parameters stay put, and 0 is what is logged.
    w = np.asarray(state["params"]["w"])
    state, m = step(state, {}, _fake_batches())
    assert float(m["train/lr"]) == float(lr(0)) == 0.0 != float(lr(1))
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), w)
    assert int(train_step.update_count(state)) == 1 and int(state["step"]) == 2

    state, m = step(state, {}, _fake_batches())  # step 2 applies lr(1) = 0.25
    assert float(m["train/lr"]) == float(lr(1)) == 0.25 != float(lr(2))
    assert np.abs(np.asarray(state["params"]["w"]) - w).max() > 0.1


def test_step_key_depends_on_seed_step_dataset_and_micro_batch_only(monkeypatch):
    """The key is a function of (seed, step, dataset, micro-batch): a resumed run redraws the same values."""
    step, _, state = _fake_step(monkeypatch)
    norm = lambda st, b=None: float(step(jax.tree.map(jnp.copy, st), {}, b or _fake_batches())[1]["train/grad_norm"])
    at = lambda s: dict(state, step=jnp.asarray(s, jnp.int32))
    assert norm(at(3)) == norm(at(3))  # resume: same step, same draw
    assert len({norm(at(s)) for s in range(4)}) == 4  # a new draw every step
    step_seed1, _, _ = _fake_step(monkeypatch, seed=1)
    assert float(step_seed1(at(3), {}, _fake_batches())[1]["train/grad_norm"]) != norm(at(3))
    step_micro, _, _ = _fake_step(monkeypatch, micro={"a": 2, "b": 1})
    assert float(step_micro(at(3), {}, _fake_batches())[1]["train/grad_norm"]) != norm(at(3))

    # Per dataset by name: dataset "b" alone (round_robin) draws what it draws next to "a".
    key = train_step.step_key(0, 3)
    weights, micro = {"a": 1.0, "b": 0.5}, {"a": 1, "b": 1}
    g_b, _ = train_step.mixture_grads(None, state["params"], {}, {"b": _fake_batches()["b"]}, weights, micro, rng=key)
    g_ab, _ = train_step.mixture_grads(None, state["params"], {}, _fake_batches(), weights, micro, rng=key)
    g_a, _ = train_step.mixture_grads(None, state["params"], {}, {"a": _fake_batches()["a"]}, weights, micro, rng=key)
    np.testing.assert_allclose(np.asarray(g_ab["w"]), np.asarray(g_a["w"] + g_b["w"]), rtol=1e-6)
    assert not np.allclose(np.asarray(g_a["w"]) / weights["a"], np.asarray(g_b["w"]) / weights["b"])


def test_frozen_vision_encoder_step_ignores_the_key(config, single, steps):
    """With the encoder frozen nothing draws from the key: any step number gives bitwise the same step."""
    tr, state, frozen = single
    state = _randomize_gates(state)
    batches = {k: train.to_global(v, tr) for k, v in make_batches(config, 5).items()}
    outs = [steps["all"](jax.tree.map(jnp.copy, dict(state, step=state["step"] + s)), frozen, batches) for s in (0, 7)]
    (new0, m0), (new7, m7) = outs
    np.testing.assert_array_equal(np.asarray(m0["train/loss"]), np.asarray(m7["train/loss"]))
    for a, b in zip(jax.tree.leaves(new0["params"]), jax.tree.leaves(new7["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
