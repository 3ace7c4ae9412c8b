"""The config schema shared by every file in `configs/`, and its validation.

`base_config()` holds every field with its default; a config file changes what differs. `validate(config)`
runs before anything is allocated and names the field that is wrong.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from flamingo_jax import sharding
from flamingo_jax.models.flamingo import DEFAULT_TRAINABLE, FlamingoConfig


def chinchilla_lm(num_layers: int, dim: int, num_heads: int, vocab_size: int = 32000,
                  max_len: int = 2048) -> dict[str, Any]:
    """A Chinchilla-style LM (DESIGN.md section 1): RMSNorm, GELU FFN 4x, rotary positions, untied."""
    return dict(family="chinchilla", vocab_size=vocab_size, num_layers=num_layers, dim=dim, num_heads=num_heads,
                head_dim=dim // num_heads, mlp_dim=4 * dim, max_len=max_len)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        vision=dict(kind="nfnet", variant="F6", widths=None, depths=None, stem_widths=None, group_size=128,
                    image_size=320, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        resampler=dict(num_layers=6, num_latents=64, num_heads=16, head_dim=128, ffw_mult=4, max_frames=8),
        xattn=dict(every=1, num_heads=16, head_dim=128, ffw_mult=4),
        lm=chinchilla_lm(24, 2048, 16),
        trainable=DEFAULT_TRAINABLE,
        # Trainable weights and optimiser state in float32; compute and frozen weights in bfloat16 (paper).
        dtype="bfloat16",
        param_dtype="float32",
        frozen_param_dtype="bfloat16",
        remat="none",
        attention="xla",
    ))
    # The ('data', 'fsdp', 'tensor') device mesh; -1 takes the remaining devices.
    c.mesh = (-1, 1, 1)
    c.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    c.seed = 0
    return c


def model_config(config: ml_collections.ConfigDict) -> FlamingoConfig:
    return FlamingoConfig.from_dict(config.model.to_dict())


def validate(config: ml_collections.ConfigDict) -> FlamingoConfig:
    """Checks everything that can be checked without devices or data; returns the typed model config."""
    try:
        mcfg = model_config(config)
    except TypeError as e:
        raise ValueError(f"config.model: {e}") from e
    mcfg.validate()
    mesh = list(config.mesh)
    if len(mesh) != len(sharding.MESH_AXES):
        raise ValueError(f"config.mesh needs {len(sharding.MESH_AXES)} sizes {sharding.MESH_AXES}, got {mesh}")
    if mesh.count(-1) > 1 or any(s == 0 or s < -1 for s in mesh):
        raise ValueError(f"config.mesh {mesh}: sizes must be positive, with at most one -1")
    sharding.rules_from_config(config.sharding.rules)
    return mcfg
