"""The two-stage recipe at toy scale: stage 1 trains and evaluates through the trainer, its vision encoder is
exported, and stage 2 loads it bitwise and keeps it frozen."""

import json

import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from flamingo_jax import checkpoint, recipe, sharding, train
from flamingo_jax.data import synthetic
from flamingo_jax.pretrained import load


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.prepare_synthetic(root, num_train=64, num_eval=16, image_size=32)
    return root


VISION = dict(widths=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_widths=(4, 8, 8), group_size=8, image_size=32)


def tiny_recipe(root: str) -> ml_collections.ConfigDict:
    from configs import demo_two_stage

    r = demo_two_stage.get_config(root)
    s1, s2 = r.stages.stage1, r.stages.stage2
    for c in (s1, s2):
        c.data.synthetic.update(num_train=64, num_eval=16, image_size=32)
        c.model.vision.update(**VISION)
        for ds in c.data.datasets.values():
            ds.batch_size = 8
            ds.seq_len = min(ds.seq_len, 32)
        c.checkpoint.every_steps = 0
    s1.model.text.update(num_layers=1, dim=32, num_heads=2, mlp_dim=64, max_len=32)
    s1.model.embed_dim = 16
    s1.eval.zeroshot.batch_size = 32
    s1.train.update(steps=3, log_every=1, eval_every=3, eval_batches=1)
    s2.model.resampler.update(num_layers=1, num_latents=4, num_heads=2, head_dim=8)
    s2.model.xattn.update(every=2, num_heads=2, head_dim=8, ffw_mult=2)
    s2.model.lm = dict(s2.model.lm, num_layers=2, dim=32, num_heads=2, head_dim=16, mlp_dim=64, max_len=64)
    s2.train.update(steps=2, log_every=1, eval_every=2, eval_batches=1)
    return r


def test_stage1_encoder_is_exported_and_frozen_in_stage2_bitwise(data_root, tmp_path):
    r = tiny_recipe(data_root)
    results = recipe.run(r, str(tmp_path))

    # Stage 1 evaluated zero-shot retrieval and classification, and logged them.
    s1 = results["stage1"]
    for k in ("eval/i2t_r1", "eval/t2i_r5", "eval/retrieval/ltip/i2t_r10", "eval/zeroshot/top1"):
        assert 0.0 <= s1[k] <= 1.0, k
    assert s1["eval/zeroshot/chance"] == pytest.approx(1 / 32)
    rows = [json.loads(x) for x in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/retrieval/align/t2i_r1" in row for row in rows)
    assert all(row["train/loss"] > 0 for row in rows if "train/loss" in row)

    # The file holds exactly the vision parameters of stage 1's last checkpoint, with the architecture.
    enc = str(tmp_path / "stage1" / recipe.ENCODER_FILE)
    tensors = load_file(enc)
    src = checkpoint.pick(str(tmp_path / "stage1"))
    stage1_tr = train.build(src_config(src), train.validate(src_config(src)), sharding.make_mesh((-1, 1, 1)))
    abstract, _ = train.abstract_state(stage1_tr)
    targets = {k: v for k, v in checkpoint.flatten(abstract["params"]).items() if k.startswith("vision/")}
    saved = checkpoint.read_params(src.manager, src.step, targets)
    assert sorted(tensors) == sorted(k[len("vision/") :] for k in saved)
    for k, v in saved.items():
        assert np.array_equal(np.asarray(v), tensors[k[len("vision/") :]]), k
    with load.TensorReader(enc) as reader:
        arch = json.loads(reader.metadata["architecture"])
    assert arch["widths"] == list(VISION["widths"]) and arch["stem_widths"] == [4, 8, 8, 8]

    # Stage 2 loads it bitwise into its frozen parameters; nothing of the vision tower is trainable.
    s2 = r.stages.stage2
    s2.model.vision_pretrained = enc
    mcfg = train.validate(s2)
    tr = train.build(s2, mcfg, sharding.make_mesh((-1, 1, 1)))
    state, frozen = train.init_state(tr)
    assert "vision" not in state["params"]
    flat = checkpoint.flatten(frozen)
    for name, value in tensors.items():
        assert np.array_equal(np.asarray(flat[f"vision/{name}"]), value), name
    # ... and trained on it unchanged: its checkpoint recorded the same frozen weights.
    meta = checkpoint.pick(str(tmp_path / "stage2")).meta
    assert meta["frozen_fingerprint"] == checkpoint.fingerprint(frozen)
    assert results["stage2"]["eval/loss"] > 0


def src_config(src):
    return ml_collections.ConfigDict(src.meta["config"])


def test_recipe_checks_every_stage_before_running_any(data_root, tmp_path):
    r = tiny_recipe(data_root)
    r.stages.stage2.train.strategy = "sometimes"
    with pytest.raises(ValueError, match=r"recipe\.stages\.stage2: config\.train\.strategy"):
        recipe.run(r, str(tmp_path))
    assert not (tmp_path / "stage1").exists()
    r = tiny_recipe(data_root)
    r.stages.stage2.model.vision_pretrained = "{stage3}/encoder.safetensors"
    with pytest.raises(ValueError, match="names stage 'stage3'"):
        recipe.run(r, str(tmp_path))
