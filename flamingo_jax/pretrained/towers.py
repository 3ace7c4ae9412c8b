"""Loading a Flamingo's pretrained towers (the config's `lm_pretrained` / `vision_pretrained`) into their shards."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from flamingo_jax import sharding
from flamingo_jax.models import flamingo
from flamingo_jax.pretrained import hf_clip, hf_lm, nfnet_convert


def load_towers(mcfg: flamingo.FlamingoConfig, mesh: Mesh, rules: sharding.Rules) -> dict[tuple, jax.Array]:
    """{parameter path: array} for every parameter of the configured pretrained towers, each array read shard by
    shard onto the mesh (no host ever holds a whole tensor it does not own). Empty when none is configured."""
    if not (mcfg.lm_pretrained or mcfg.vision_pretrained):
        return {}
    abstract = nnx.eval_shape(lambda: flamingo.Flamingo(mcfg, rngs=nnx.Rngs(0)))
    shardings = sharding.state_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    loaded: dict[str, nnx.State] = {}
    if mcfg.lm_pretrained:
        loaded["lm"] = hf_lm.load_lm_state(
            mcfg.lm_pretrained, nnx.state(abstract.lm, nnx.Param), mcfg.lm, shardings=shardings["lm"]
        )
    if mcfg.vision_pretrained:
        target = nnx.state(abstract.vision, nnx.Param)
        if mcfg.vision.kind == "clip_vit":
            loaded["vision"] = hf_clip.load_clip_state(
                mcfg.vision_pretrained, target, mcfg.vision.vit_config(), shardings=shardings["vision"]
            )
        else:
            loaded["vision"] = nfnet_convert.load_nfnet_state(
                mcfg.vision_pretrained, target, shardings=shardings["vision"]
            )
    out = {}
    for tower, state in loaded.items():
        for path, var in nnx.to_flat_state(state):
            out[(tower, *path)] = var.get_value() if hasattr(var, "get_value") else var.value
    return out


def replace_leaves(tree: dict, values: dict[tuple, Any]) -> tuple[dict, set[tuple]]:
    """A copy of a nested dict with the leaves at `values`' paths replaced (cast to the leaf's dtype), and the
    set of paths it used."""
    used = set()

    def walk(node: Any, prefix: tuple) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*prefix, k)) for k, v in node.items()}
        if prefix in values:
            used.add(prefix)
            return values[prefix].astype(node.dtype)
        return node

    return walk(tree, ()), used
