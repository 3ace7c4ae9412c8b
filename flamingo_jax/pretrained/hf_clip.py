"""CLIP ViT vision towers from local Hugging Face-format directories.

Accepts a `CLIPVisionModel` directory or a full `CLIPModel` one (e.g. a local copy of
openai/clip-vit-large-patch14, whose config nests `vision_config` and whose tensors carry a `vision_model.`
prefix; the text tower and the projections are then ignored). Mapping onto `models.vit.VisionTransformer`:

    embeddings.patch_embedding.weight [D, 3, p, p]     patch_embed [p, p, 3, D]
    embeddings.class_embedding [D]                      cls_token
    embeddings.position_embedding.weight [N+1, D]       pos_embed
    pre_layrnorm / post_layernorm                        pre_norm / post_norm
    encoder.layers.i.self_attn.{q,k,v}_proj [D, D]      layers/{q,k,v}/kernel [D, H, hd]  (stacked over i)
    encoder.layers.i.self_attn.out_proj [D, D]          layers/o/kernel [H, hd, D]
    encoder.layers.i.layer_norm1/2, mlp.fc1/fc2          layers/attn_norm, mlp_norm, fc1, fc2

Images must be normalised with the statistics in the directory's `preprocessor_config.json` (`image_stats`),
which for OpenAI's towers are CLIP's own (`CLIP_MEAN`, `CLIP_STD`), not ImageNet's.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from flamingo_jax import sharding as sharding_lib
from flamingo_jax.models import vit
from flamingo_jax.pretrained import load

CLIP_MEAN, CLIP_STD = vit.CLIP_MEAN, vit.CLIP_STD


def vit_config_from_hf(path: str | Path) -> vit.ViTConfig:
    f = Path(path) / "config.json"
    if not f.exists():
        raise load.CheckpointError(f"{f} does not exist: an HF CLIP directory needs its config.json")
    hf: dict[str, Any] = json.loads(f.read_text())
    if hf.get("model_type") == "clip":
        hf = hf.get("vision_config") or {}
    elif hf.get("model_type") != "clip_vision_model":
        raise ValueError(f"{f}: model_type {hf.get('model_type')!r} is not a CLIP model")
    if int(hf.get("num_channels", 3)) != 3:
        raise ValueError(f"{f}: num_channels={hf['num_channels']}; only RGB towers are supported")
    # Defaults are CLIPVisionConfig's (ViT-B/32), for the keys a saved config may omit.
    return vit.ViTConfig(
        image_size=int(hf.get("image_size", 224)),
        patch_size=int(hf.get("patch_size", 32)),
        width=int(hf.get("hidden_size", 768)),
        num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        mlp_dim=int(hf.get("intermediate_size", 3072)),
        act=hf.get("hidden_act", "quick_gelu"),
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
    )


def image_stats(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the directory's `preprocessor_config.json`, else OpenAI CLIP's."""
    f = Path(path) / "preprocessor_config.json"
    if not f.exists():
        return CLIP_MEAN, CLIP_STD
    pre = json.loads(f.read_text())
    mean, std = pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{f}: image_mean/image_std need 3 values each, got {mean} / {std}")
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def clip_sources(cfg: vit.ViTConfig, names: Collection[str]) -> tuple[dict[str, Any], list[str]]:
    """(parameter path -> Source, regexes of checkpoint tensors to ignore) for a VisionTransformer."""
    probe = "embeddings.class_embedding"
    prefix = next((p for p in ("vision_model.", "") if p + probe in names), None)
    if prefix is None:
        raise load.CheckpointError(f"no tensor {probe!r} or 'vision_model.{probe}': not a CLIP vision checkpoint")
    p, n = prefix, cfg.num_layers
    layer = p + "encoder.layers.{}."
    per_layer = lambda suffix, **kw: load.stack(lambda i: load.View(layer.format(i) + suffix, **kw), n)
    lin = lambda suffix, n_in: load.stack(lambda i: load.torch_linear(layer.format(i) + suffix, n_in, 3), n)
    src: dict[str, Any] = {
        "patch_embed": load.View(p + "embeddings.patch_embedding.weight", groups=((3,), (2,), (0,), (1,))),
        "cls_token": load.View(p + "embeddings.class_embedding"),
        "pos_embed": load.View(p + "embeddings.position_embedding.weight"),
        "pre_norm/scale": load.View(p + "pre_layrnorm.weight"),
        "pre_norm/bias": load.View(p + "pre_layrnorm.bias"),
        "post_norm/scale": load.View(p + "post_layernorm.weight"),
        "post_norm/bias": load.View(p + "post_layernorm.bias"),
        "layers/q/kernel": lin("self_attn.q_proj.weight", 1),
        "layers/k/kernel": lin("self_attn.k_proj.weight", 1),
        "layers/v/kernel": lin("self_attn.v_proj.weight", 1),
        "layers/o/kernel": lin("self_attn.out_proj.weight", 2),
        "layers/o/bias": per_layer("self_attn.out_proj.bias"),
        "layers/fc1/kernel": per_layer("mlp.fc1.weight", groups=((1,), (0,))),
        "layers/fc1/bias": per_layer("mlp.fc1.bias"),
        "layers/fc2/kernel": per_layer("mlp.fc2.weight", groups=((1,), (0,))),
        "layers/fc2/bias": per_layer("mlp.fc2.bias"),
    }
    for x in "qkv":
        src[f"layers/{x}/bias"] = load.stack(
            lambda i, x=x: load.merged(layer.format(i) + f"self_attn.{x}_proj.bias", 2), n
        )
    for ours, theirs in (("attn_norm", "layer_norm1"), ("mlp_norm", "layer_norm2")):
        src[f"layers/{ours}/scale"] = per_layer(f"{theirs}.weight")
        src[f"layers/{ours}/bias"] = per_layer(f"{theirs}.bias")
    # position_ids: a buffer older checkpoints saved. Under a full CLIPModel, everything outside the vision
    # tower (text tower, projections, logit_scale) belongs to other models.
    ignore = [r"(.*\.)?embeddings\.position_ids"]
    if prefix:
        ignore.append(r"(?!vision_model\.).*")
    return src, ignore


def load_clip_state(
    path: str | Path, abstract_state: nnx.State, cfg: vit.ViTConfig, *, shardings: nnx.State | None = None
) -> nnx.State:
    """The `VisionTransformer` state read from an HF CLIP dir, shard by shard, cast to the abstract dtypes."""
    with load.TensorReader(path) as reader:
        sources, ignore = clip_sources(cfg, reader.names)
        return load.load_state(reader, abstract_state, sources, shardings=shardings, ignore=ignore)


def load_clip_vision(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    attention_impl: str = "xla",
    remat: str = "none",
) -> vit.VisionTransformer:
    """A `VisionTransformer` with the HF directory's architecture and weights."""
    cfg = vit_config_from_hf(path)

    def make() -> vit.VisionTransformer:
        return vit.VisionTransformer(
            cfg,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_impl=attention_impl,
            remat=remat,
            rngs=nnx.Rngs(0),
        )

    return load.load_module(make, path, lambda _, reader: clip_sources(cfg, reader.names), mesh=mesh, rules=rules)
