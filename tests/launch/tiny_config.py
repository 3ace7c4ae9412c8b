"""The trainer tests' tiny demo config (tests/test_train.py `tiny_config`) as a config file, for trainer processes
started on the command line: `--config=tests/launch/tiny_config.py:DATA_ROOT`.

The body is a copy, not an import: importing tests.test_train would import flamingo_jax.train a second time in a
process that runs it as __main__, defining its flags twice. Every dataset's global batch is 8, one row per device
of an 8-device mesh however the devices are split over processes; metrics every step, no evaluation. Fewer
datasets compile faster (the step holds one forward and backward pass per dataset).
"""

from configs import demo


def get_config(arg: str):
    """`ROOT` or `ROOT,name,...`: the synthetic data directory, then optionally the datasets to keep."""
    root, *keep = arg.split(",")
    c = demo.get_config(root)
    if keep:
        c.data.datasets = {k: v for k, v in c.data.datasets.items() if k in keep}
    c.data.synthetic.update(num_train=64, num_eval=16, image_size=32)
    c.model.trainable = (".*",)  # no stage-1 encoder here: the tiny run trains its random NFNet
    c.model.vision.update(widths=(16, 16, 32, 32), stem_widths=(4, 8, 8), group_size=8, image_size=32)
    c.model.resampler.update(num_layers=1, num_latents=4, num_heads=4, head_dim=8)
    c.model.xattn.update(every=2, num_heads=4, head_dim=8, ffw_mult=2)
    c.model.lm = dict(c.model.lm, num_layers=2, dim=32, num_heads=4, head_dim=8, mlp_dim=64, max_len=64)
    for ds in c.data.datasets.values():
        ds.batch_size = 8
        ds.seq_len = min(ds.seq_len, 32)
    c.train.update(steps=4, log_every=1, eval_every=0, eval_batches=1)
    return c
