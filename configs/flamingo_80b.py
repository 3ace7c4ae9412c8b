"""Flamingo-80B (DESIGN.md table): 80-layer Chinchilla-style LM (d=8192, 64 heads), a GATED XATTN-DENSE block
before every 7th LM layer (12 blocks). Sharded: 16-way tensor (Megatron) parallelism as in the paper, the rest
FSDP, with full rematerialisation per layer."""

from flamingo_jax.config import base_config, chinchilla_lm


def get_config(arg=None):
    c = base_config()
    c.model.lm = chinchilla_lm(num_layers=80, dim=8192, num_heads=64)
    c.model.xattn.update(every=7, num_heads=64, head_dim=128)
    c.model.remat = "full"
    c.mesh = (1, -1, 16)
    return c
