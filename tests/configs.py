"""Small configs shared by trainer tests (every sharded dim divisible by a (2, 2, 2) mesh)."""

import ml_collections

from flamingo_jax.config import base_config

VOCAB = 50


def tiny_train_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.vision.update(
        variant=None,
        widths=(16, 16, 32, 32),
        depths=(1, 1, 1, 1),
        stem_widths=(4, 8, 8),
        group_size=8,
        image_size=32,
    )
    c.model.resampler.update(num_layers=1, num_latents=4, num_heads=2, head_dim=8, max_frames=2)
    c.model.xattn.update(every=2, num_heads=2, head_dim=8, ffw_mult=2)
    c.model.lm = dict(
        family="llama",
        vocab_size=VOCAB,
        num_layers=3,
        dim=16,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=32,
        max_len=64,
    )
    c.model.dtype = c.model.frozen_param_dtype = "float32"
    c.model.allow_random_towers = True  # the LM and NFNet are frozen and random: fine for mechanics
    for name, ds in c.data.datasets.items():
        ds.batch_size = 8
        ds.seq_len = 16 if name == "m3w" else 8
        ds.max_media = 2 if name == "m3w" else 1
        ds.frames = 2 if name == "vtp" else 1
    c.optimizer.update(warmup_steps=0, lr=1e-2)
    c.train.steps = 10
    return c
