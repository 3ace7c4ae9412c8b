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


def tiny_contrastive_config() -> ml_collections.ConfigDict:
    """A stage-1 (contrastive) config with two pair datasets, sized for a (2, 4, 1) mesh."""
    from flamingo_jax.config import contrastive_model

    c = base_config()
    c.stage = "contrastive"
    c.model = contrastive_model(image_size=32)
    # A one-layer CLIP ViT compiles in a fraction of an NFNet's time; the loss and its sharding do not depend on
    # the tower (tests/test_recipe.py runs stage 1 with an NFNet).
    c.model.vision = dict(kind="clip_vit", image_size=32, patch_size=8, width=16, num_layers=1, num_heads=2, mlp_dim=32)
    c.model.text.update(vocab_size=VOCAB + 14, num_layers=2, dim=16, num_heads=2, mlp_dim=32, max_len=16)
    c.model.update(embed_dim=8, dtype="float32", frozen_param_dtype="float32")
    c.data.datasets = {k: c.data.datasets[k] for k in ("ltip", "align")}
    for ds in c.data.datasets.values():
        ds.batch_size = 8
        ds.seq_len = 12
    c.optimizer.update(warmup_steps=0, lr=1e-3, weight_decay=0.0)
    c.train.steps = 4
    return c
