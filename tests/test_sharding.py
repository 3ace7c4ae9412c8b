import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from flamingo_jax import sharding
from flamingo_jax.models import layers


def test_mesh_fills_minus_one_and_rejects_mismatch():
    mesh = sharding.make_mesh((2, -1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(sharding.ShardingError, match="needs 16 devices, but 8"):
        sharding.make_mesh((2, 4, 2))
    with pytest.raises(sharding.ShardingError, match="not divisible"):
        sharding.make_mesh((3, -1, 1))
    with pytest.raises(sharding.ShardingError, match="at most one"):
        sharding.make_mesh((-1, -1, 1))


def test_logical_rules_map_and_do_not_reuse_mesh_axes():
    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("embed", "mlp"), rules, shape=(16, 32), mesh=mesh) == P("fsdp", "tensor")
    # `batch` takes data and fsdp; a later `embed` (fsdp) must not reuse fsdp.
    spec = sharding.logical_to_spec(("batch", "length", "embed"), rules, shape=(8, 4, 16), mesh=mesh)
    assert spec == P(("data", "fsdp"), None, None)


def test_unmatched_axis_and_indivisible_dim_are_errors():
    mesh = sharding.make_mesh((1, 2, 4))
    with pytest.raises(sharding.ShardingError, match=r"'experts'.*no sharding rule"):
        sharding.logical_to_spec(("experts", "embed"), sharding.DEFAULT_RULES, shape=(4, 8), mesh=mesh)
    with pytest.raises(sharding.ShardingError, match="not divisible by mesh axes"):
        sharding.logical_to_spec(("embed", "mlp"), sharding.DEFAULT_RULES, shape=(16, 6), mesh=mesh,
                                 what="parameter w")
    # Activations fall back to replication instead.
    spec = sharding.logical_to_spec(("batch", "mlp"), sharding.DEFAULT_RULES, shape=(3, 6), mesh=mesh, strict=False)
    assert spec == P(None, None)


def test_only_kv_heads_are_replicated_when_the_tensor_shards_do_not_divide_them():
    mesh = sharding.make_mesh((1, 2, 4))
    spec = lambda axes, shape: sharding.logical_to_spec(axes, sharding.DEFAULT_RULES, shape=shape, mesh=mesh)
    assert spec(("embed", "kv_heads", "head_dim"), (16, 8, 4)) == P("fsdp", "tensor", None)
    assert spec(("embed", "kv_heads", "head_dim"), (16, 2, 4)) == P("fsdp", None, None)  # 2 kv heads, 4 shards
    with pytest.raises(sharding.ShardingError, match=r"dim 1 \(heads\).*config\.model\.lm\.num_heads"):
        spec(("embed", "heads", "head_dim"), (16, 2, 4))


def test_state_shardings_from_module_axes():
    mesh = sharding.make_mesh((1, 2, 4))
    model = nnx.eval_shape(lambda: layers.FeedForward(16, 32, act="gelu", gated=True, rngs=nnx.Rngs(0)))
    sh = sharding.state_shardings(nnx.state(model), mesh, sharding.DEFAULT_RULES)
    assert sh["up"]["kernel"].get_value().spec == P("fsdp", "tensor")
    assert sh["down"]["kernel"].get_value().spec == P("tensor", "fsdp")
    # A parameter whose axes name no rule fails with its path.
    bad = nnx.eval_shape(lambda: layers.DenseGeneral(16, 8, ("embed", "experts"), rngs=nnx.Rngs(0)))
    with pytest.raises(sharding.ShardingError, match=r"parameter kernel.*'experts'"):
        sharding.state_shardings(nnx.state(bad), mesh, sharding.DEFAULT_RULES)


def test_constrain_is_a_no_op_without_context_and_shards_within():
    x = jnp.ones((8, 4, 16))
    assert sharding.constrain(x, ("batch", "length", "embed")) is x
    mesh = sharding.make_mesh((2, 2, 2))
    with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", "length", "embed")))(x)
    assert y.sharding.spec[0] == ("data", "fsdp")
    assert {sh.data.shape for sh in y.addressable_shards} == {(2, 4, 16)}


def test_sharded_step_compiles_without_involuntary_rematerialization(capfd):
    # XLA warns, on stderr, when it can only reshard an activation by replicating it whole. The embedding
    # lookup did that on a (2, 2, 2) mesh before its table was gathered over `fsdp` first.
    from benchmarks.train_step import random_batches
    from flamingo_jax import train
    from tests.configs import tiny_train_config

    c = tiny_train_config()
    c.mesh = (2, 2, 2)
    tr = train.build(c, train.validate(c), sharding.make_mesh(c.mesh))
    steps, _ = train.compile_steps(tr)
    batches = random_batches(c)
    batches = {m: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()} for m, b in batches.items()}
    state, frozen = train.abstract_state(tr)
    capfd.readouterr()
    with sharding.use_mesh_rules(tr.mesh, tr.rules):
        steps["all"].lower(state, frozen, batches).compile()
    err = capfd.readouterr().err
    assert "Involuntary full rematerialization" not in err, err[:2000]


def test_frozen_vision_encoder_spreads_over_every_mesh_axis():
    """On a tensor-only mesh the batch is not split at all (`batch` is data x fsdp), yet the frozen encoder's
    frames are: in the compiled per-device program every convolution sees 16 / 8 = 2 frames, and the visual
    tokens equal the single-device ones."""
    import re

    import numpy as np

    from flamingo_jax import train
    from flamingo_jax.models import flamingo
    from tests.configs import tiny_train_config

    c = tiny_train_config()
    model = flamingo.Flamingo(train.validate(c), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    media = jax.random.randint(jax.random.key(1), (8, 2, 1, 32, 32, 3), 0, 256).astype(jnp.uint8)
    encode = jax.jit(lambda s, m: nnx.merge(graphdef, s).encode_media(m))
    mesh = sharding.make_mesh((1, 1, 8))
    with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
        hlo = encode.lower(state, media).compile().as_text()
        got = encode(state, media)
    conv_batches = [int(m) for m in re.findall(r"= f32\[(\d+),[\d,]*\]\{[^}]*\} convolution\(", hlo)]
    # 16 frames over 8 devices: 2 each. Unspread, every device would see all 16 in every convolution.
    assert set(conv_batches) <= {2, 16} and conv_batches.count(2) > 2 * conv_batches.count(16), conv_batches
    np.testing.assert_allclose(np.asarray(got), np.asarray(model.encode_media(media)), rtol=1e-5, atol=1e-5)


def test_activations_keep_the_largest_dividing_subset_of_their_mesh_axes():
    mesh = sharding.make_mesh((2, 2, 2))
    spec = lambda n: sharding.logical_to_spec(("vision_batch",), sharding.DEFAULT_RULES, shape=(n,), mesh=mesh,
                                              strict=False)
    assert spec(16) == P(("data", "fsdp", "tensor"))
    assert spec(12) == P(("data", "fsdp"))
    assert spec(6) == P("data")
    assert spec(3) == P(None)
