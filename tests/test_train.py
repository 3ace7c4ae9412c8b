"""The trainer end to end on tiny synthetic data: metrics, TensorBoard, evaluation, failure modes."""

import json
import pathlib

import pytest

from flamingo_jax import train
from flamingo_jax.data import synthetic


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.prepare_synthetic(root, num_train=64, num_eval=16, image_size=32)
    return root


def tiny_config(root: str):
    from configs import demo

    c = demo.get_config(root)
    c.data.synthetic.update(num_train=64, num_eval=16, image_size=32)
    c.model.trainable = (".*",)  # no stage-1 encoder here: the tiny run trains its random NFNet
    c.model.vision.update(widths=(16, 16, 32, 32), stem_widths=(4, 8, 8), group_size=8, image_size=32)
    c.model.resampler.update(num_layers=1, num_latents=4, num_heads=2, head_dim=8)
    c.model.xattn.update(every=2, num_heads=2, head_dim=8, ffw_mult=2)
    c.model.lm = dict(c.model.lm, num_layers=2, dim=32, num_heads=2, head_dim=16, mlp_dim=64, max_len=64)
    for ds in c.data.datasets.values():
        ds.batch_size = 8  # the default mesh spreads the batch over all 8 test devices
        ds.seq_len = min(ds.seq_len, 32)
    c.train.update(steps=4, log_every=2, eval_every=4, eval_batches=1)
    return c


def test_demo_like_run_writes_metrics_tensorboard_and_eval(data_root, tmp_path):
    final = train.train(tiny_config(data_root), str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    required = {
        "step",
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/step_time_s",
        "perf/tokens_per_s",
        "perf/mfu",
        "perf/data_wait_frac",
    }
    required |= {f"train/loss/{m}" for m in ("m3w", "ltip", "vtp", "align")}
    for r in train_rows:
        assert required <= set(r), required - set(r)
        assert 0 < r["perf/mfu"] < 1 and r["train/loss"] > 0
    evals = [r for r in rows if "eval/loss" in r]
    assert evals and {"eval/loss_shuffled_images", "eval/loss/m3w"} <= set(evals[-1])
    assert final["eval/loss"] == evals[-1]["eval/loss"]
    assert list(pathlib.Path(tmp_path, "tensorboard").glob("events.out.tfevents.*"))


def test_bad_config_fails_before_any_compute(data_root, tmp_path):
    c = tiny_config(data_root)
    c.model.xattn.every = 0
    with pytest.raises(ValueError, match=r"model\.xattn\.every"):
        train.train(c, str(tmp_path))
    c = tiny_config(data_root)
    c.data.datasets.ltip.batch_size = 6
    c.data.datasets.ltip.micro_batches = 4
    with pytest.raises(ValueError, match=r"config\.data\.datasets\.ltip\.batch_size"):
        train.train(c, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_consecutive_non_finite_steps_stop_the_run(data_root, tmp_path):
    c = tiny_config(data_root)
    c.optimizer.update(lr=1e30, warmup_steps=0, schedule="warmup_constant")  # parameters blow up after step 1
    c.train.update(steps=8, max_consecutive_skips=2, eval_every=0)
    with pytest.raises(FloatingPointError, match="2 consecutive steps"):
        train.train(c, str(tmp_path))


def test_throughput_counts_only_the_datasets_each_step_ran():
    # Two datasets of different sizes: "big" 8 x 32 tokens at 100 FLOPs per step, "small" 2 x 8 at 10.
    shapes = {"big": dict(tokens=(8, 32)), "small": dict(tokens=(2, 8))}
    window = train.Throughput.from_shapes({"big": 100.0, "small": 10.0}, shapes)
    names = ["big", "small"]
    for step in range(3):  # round_robin: big, small, big
        window.add(train._schedule(names, "round_robin", step))
    m = window.metrics(elapsed=2.0, peak_flops=1000.0)
    assert m["perf/step_time_s"] == 2.0 / 3
    assert m["perf/tokens_per_s"] == (256 + 16 + 256) / 2.0  # not 3 * (256 + 16) / 2
    assert m["perf/examples_per_s"] == (8 + 2 + 8) / 2.0
    assert m["perf/mfu"] == (100 + 10 + 100) / 2.0 / 1000.0
    window.reset()
    for step in range(2):  # accumulate / merged: every dataset every step
        window.add(train._schedule(names, "accumulate", step))
    m = window.metrics(elapsed=1.0, peak_flops=1000.0)
    assert m["perf/tokens_per_s"] == 2 * (256 + 16) and m["perf/mfu"] == 2 * 110 / 1000.0
