"""Flamingo-9B (DESIGN.md table): 40-layer Chinchilla-style LM (d=4096, 32 heads), a GATED XATTN-DENSE block
before every 4th LM layer (10 blocks).

Target: a TPU v4-64 slice (32 chips, topology v4:2x4x4), mesh (2, 16, 1): FSDP over 16 chips shards the 8.7B
frozen weights and the optimiser state of 2B trainable ones (replicated, they alone would need 49 GB per chip),
data parallel over the other 2. Global batch 32 per dataset. Checked with `python -m flamingo_jax.tools.plan
--config=configs/flamingo_9b.py --topology=v4-64` (docs/benchmarks.md).

The frozen towers must be pretrained (the trainer refuses random frozen towers at start): point
`--config.model.lm_pretrained` at a Hugging Face LM directory (config.json + *.safetensors; its config decides the
LM's architecture, replacing `model.lm` below, and its tokenizer goes in `--config.data.tokenizer`) and
`--config.model.vision_pretrained` at the stage-1 NFNet (a file from `flamingo_jax.pretrained.nfnet_convert`).
Compiling and planning need no weights.
"""

from flamingo_jax.config import base_config, chinchilla_lm


def get_config(arg=None):
    c = base_config()
    c.model.lm = chinchilla_lm(num_layers=40, dim=4096, num_heads=32)
    c.model.xattn.update(every=4, num_heads=32, head_dim=128)
    c.model.remat = "full"  # as for 3B (docs/benchmarks.md): activations, not recomputation, are the limit
    c.mesh = (-1, 16, 1)  # (2, 16, 1) on the target
    for ds in c.data.datasets.values():
        ds.batch_size = 32
    return c
