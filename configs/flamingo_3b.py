"""Flamingo-3B (DESIGN.md table): NFNet-F6 at 320px, 6-layer resampler, 24-layer Chinchilla-style LM (d=2048,
16 heads), a GATED XATTN-DENSE block before every LM layer. Not sharded in the paper: data parallel here.

    python -m flamingo_jax.tools.params --config=configs/flamingo_3b.py
"""

from flamingo_jax.config import base_config, chinchilla_lm


def get_config(arg=None):
    c = base_config()
    c.model.lm = chinchilla_lm(num_layers=24, dim=2048, num_heads=16)
    c.model.xattn.update(every=1, num_heads=16, head_dim=128)
    # Measured on one H100 at the default batch (docs/benchmarks.md): without remat the step needs ~69 GiB and
    # does not fit; `full` fits in 39.5 GB and costs 1% of step time, because the step is not recompute-bound.
    c.model.remat = "full"
    return c
