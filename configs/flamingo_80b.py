"""Flamingo-80B (DESIGN.md table): 80-layer Chinchilla-style LM (d=8192, 64 heads), a GATED XATTN-DENSE block
before every 7th LM layer (12 blocks).

Target: the paper's 1536 TPU v4 chips (a v4-3072 slice, topology v4:8x12x16), mesh (12, 8, 16): 16-way tensor
(Megatron) parallelism as in the paper, the parameters and optimiser state sharded 8 ways more (FSDP, which
subsumes the paper's ZeRO-1), data parallel over 12; full rematerialisation per layer. The mesh must both divide
the model (8192 / 16 / 8) and map onto the 8x12x16 torus: `python -m flamingo_jax.tools.plan
--config=configs/flamingo_80b.py --topology=v4-3072` lists the meshes that do, and compiles the step for the pod
(docs/benchmarks.md). Global batch 96 per dataset: one example per data x fsdp shard.

The frozen towers must be pretrained (the trainer refuses random frozen towers at start): point
`--config.model.lm_pretrained` at a Hugging Face LM directory (config.json + *.safetensors; its config decides the
LM's architecture, replacing `model.lm` below, and its tokenizer goes in `--config.data.tokenizer`) and
`--config.model.vision_pretrained` at the stage-1 NFNet (a file from `flamingo_jax.pretrained.nfnet_convert`).
Compiling and planning need no weights.
"""

from flamingo_jax.config import base_config, chinchilla_lm


def get_config(arg=None):
    c = base_config()
    c.model.lm = chinchilla_lm(num_layers=80, dim=8192, num_heads=64)
    c.model.xattn.update(every=7, num_heads=64, head_dim=128)
    c.model.remat = "full"
    c.mesh = (-1, 8, 16)  # (12, 8, 16) on the target
    for ds in c.data.datasets.values():
        ds.batch_size = 96
    return c
