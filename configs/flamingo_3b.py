"""Flamingo-3B (DESIGN.md table): NFNet-F6 at 320px, 6-layer resampler, 24-layer Chinchilla-style LM (d=2048,
16 heads), a GATED XATTN-DENSE block before every LM layer.

Target: a TPU v4-32 slice (16 chips, topology v4:2x2x4), mesh (2, 8, 1): FSDP over 8 chips (the optimiser state
of 1.35B trainable parameters, 16 GB in float32, does not fit replicated), data parallel over the other 2.
Global batch 32 per dataset. `python -m flamingo_jax.tools.plan --config=configs/flamingo_3b.py
--topology=v4-32` compiles it for that slice on any machine and prints its memory per chip (docs/benchmarks.md).

The frozen towers must be pretrained (the trainer refuses random frozen towers at start): point
`--config.model.lm_pretrained` at a Hugging Face LM directory (config.json + *.safetensors; its config decides the
LM's architecture, replacing `model.lm` below, and its tokenizer goes in `--config.data.tokenizer`) and
`--config.model.vision_pretrained` at the stage-1 NFNet (a file from `flamingo_jax.pretrained.nfnet_convert`).
Compiling and planning need no weights.

    python -m flamingo_jax.tools.params --config=configs/flamingo_3b.py
"""

from flamingo_jax.config import base_config, chinchilla_lm


def get_config(arg=None):
    c = base_config()
    c.model.lm = chinchilla_lm(num_layers=24, dim=2048, num_heads=16)
    c.model.xattn.update(every=1, num_heads=16, head_dim=128)
    # Measured on one H100 at 8 per dataset (docs/benchmarks.md): without remat the step needs ~69 GiB and does not
    # fit; `full` fits in 39.5 GB and costs 1% of step time, because the step is not recompute-bound.
    c.model.remat = "full"
    c.mesh = (-1, 8, 1)  # (2, 8, 1) on the target
    for ds in c.data.datasets.values():
        ds.batch_size = 32
    return c
