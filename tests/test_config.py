"""Every size the mesh must divide is checked before any array exists, with the config field in the message."""

import pytest

from flamingo_jax import config as config_lib
from flamingo_jax import train
from tests.configs import tiny_train_config


def mesh(d, f, t):
    return {"data": d, "fsdp": f, "tensor": t}


def check(c, shape):
    config_lib.validate_mesh(c, config_lib.validate(c), shape)


def test_a_mesh_that_divides_everything_passes():
    check(tiny_train_config(), mesh(2, 2, 2))
    check(tiny_train_config(), mesh(8, 1, 1))


@pytest.mark.parametrize(
    "edit, shape, field",
    [
        (lambda c: c.data.datasets.ltip.update(batch_size=12), mesh(1, 8, 1), r"datasets\.ltip\.batch_size=12"),
        # 16 rows in 4 micro-batches of 4: an 8-way batch would replicate each micro-batch on every rank.
        (
            lambda c: c.data.datasets.m3w.update(batch_size=16, micro_batches=4),
            mesh(2, 4, 1),
            r"datasets\.m3w\.batch_size / micro_batches \(4\)=4",
        ),
        (lambda c: None, mesh(1, 2, 4), r"model\.lm\.num_heads=2 .*`heads`"),
        # 3 kv heads on 4 tensor shards: neither replicated cleanly (4 % 3) nor split (3 % 4).
        (lambda c: c.model.lm.update(num_heads=12, num_kv_heads=3), mesh(1, 2, 4), r"model\.lm\.num_kv_heads=3"),
        (lambda c: c.model.lm.update(dim=20, head_dim=10), mesh(1, 8, 1), r"model\.lm\.dim=20"),
        (lambda c: c.model.xattn.update(num_heads=3), mesh(2, 2, 2), r"model\.xattn\.num_heads=3"),
        (lambda c: c.model.resampler.update(num_heads=3), mesh(2, 2, 2), r"model\.resampler\.num_heads=3"),
        (lambda c: c.model.lm.update(mlp_dim=33), mesh(2, 2, 2), r"model\.lm\.mlp_dim=33"),
        (
            lambda c: c.model.vision.update(
                kind="clip_vit", image_size=28, patch_size=14, width=24, num_heads=3, num_layers=1, mlp_dim=48
            ),
            mesh(2, 2, 2),
            r"model\.vision\.num_heads=3",
        ),
    ],
)
def test_indivisible_sizes_name_their_field(edit, shape, field):
    c = tiny_train_config()
    edit(c)
    with pytest.raises(ValueError, match=field):
        check(c, shape)


def test_fewer_kv_heads_than_tensor_shards_pass():
    """LLaMA-70B's layout in small: 2 kv heads on 4 tensor shards are replicated (sharding.REPLICATE_IF_INDIVISIBLE)."""
    c = tiny_train_config()
    c.model.lm.update(num_heads=8, num_kv_heads=2, vocab_size=48)
    c.model.xattn.update(num_heads=4)
    c.model.resampler.update(num_heads=4)
    check(c, mesh(1, 2, 4))


def test_rope_scaling_in_a_config_file_is_checked_by_field():
    c = tiny_train_config()
    c.model.lm.rope_scaling = dict(rope_type="linear", factor=4.0)
    assert dict(config_lib.validate(c).lm.rope_scaling) == dict(rope_type="linear", factor=4.0)
    c.model.lm.rope_scaling = dict(rope_type="longrope", factor=4.0)
    with pytest.raises(ValueError, match=r"model\.lm\.rope_scaling: rope_type 'longrope' is not supported"):
        config_lib.validate(c)


def test_trainer_checks_the_mesh_before_data_or_state(tmp_path, monkeypatch):
    """A batch the mesh cannot split fails at start: before the tokenizer, the data and any allocation."""
    c = tiny_train_config()
    c.mesh = (1, 8, 1)
    c.data.datasets.vtp.batch_size = 12
    c.data.tokenizer = str(tmp_path / "missing.model")  # reached only after the check

    def never(*args, **kwargs):
        raise AssertionError("state built before the mesh check")

    monkeypatch.setattr(train, "build", never)
    monkeypatch.setattr(train, "init_state", never)
    with pytest.raises(ValueError, match=r"config\.data\.datasets\.vtp\.batch_size=12 is not divisible by 8"):
        train.train(c, str(tmp_path / "w"))
