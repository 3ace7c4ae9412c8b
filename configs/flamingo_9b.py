"""Flamingo-9B (DESIGN.md table): 40-layer Chinchilla-style LM (d=4096, 32 heads), a GATED XATTN-DENSE block
before every 4th LM layer (10 blocks)."""

from flamingo_jax.config import base_config, chinchilla_lm


def get_config(arg=None):
    c = base_config()
    c.model.lm = chinchilla_lm(num_layers=40, dim=4096, num_heads=32)
    c.model.xattn.update(every=4, num_heads=32, head_dim=128)
    c.model.remat = "full"  # as for 3B (docs/benchmarks.md): activations, not recomputation, are the limit
    return c
