"""A Flamingo's pretrained towers (the config's `lm_pretrained` / `vision_pretrained`): settings, checks, loading.

Everything that must match the weights comes from the weights' own files, never from a default that happens to
differ: `resolve` fills the model config's `lm` (architecture, norm eps, activation, rope scaling: the HF
`config.json`) and `vision` (architecture, activation, image mean/std: the converted NFNet file's metadata or the
CLIP directory's `config.json` / `preprocessor_config.json`) before the typed config is built. At start the
trainer refuses frozen towers that would stay random (`check_random_towers`) and a tokenizer whose special ids
are not the LM's (`check_tokenizer`). `load_towers` then reads each tower straight into its shards, in its final
dtype.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from flamingo_jax import sharding
from flamingo_jax.data.tokenizer import Tokenizer, TokenizerError
from flamingo_jax.models import contrastive, flamingo, nfnet
from flamingo_jax.pretrained import hf_bert, hf_clip, hf_lm, load, nfnet_convert

# LM settings that are not the checkpoint's architecture: the config keeps them.
_LM_OWN = ("max_len", "init_std")


# ---------------------------------------------------------------------------------------------------------------
# Settings from the towers' files.
def resolve(model: Mapping[str, Any]) -> dict[str, Any]:
    """The model config dict (`config.model.to_dict()`) with the pretrained towers' settings from their files.

    Fields the config sets differently are replaced, with a warning that names them and the file.
    """
    model = dict(model)
    if model.get("lm_pretrained"):
        model["lm"] = _resolve_lm(model["lm_pretrained"], dict(model.get("lm") or {}))
    if model.get("vision_pretrained"):
        model["vision"] = _resolve_vision(model["vision_pretrained"], dict(model.get("vision") or {}))
    return model


def resolve_text(model: Mapping[str, Any]) -> dict[str, Any]:
    """Stage 1's model config dict with the text tower's architecture from `text_pretrained`'s HF BERT
    `config.json` (the pooling stays the config's choice)."""
    model = dict(model)
    path = model.get("text_pretrained")
    if path:
        given = dict(model.get("text") or {})
        files = {k: v for k, v in dataclasses.asdict(hf_bert.text_config_from_hf(path)).items() if k != "pool"}
        _report("model.text", given, files, f"{path}/config.json")
        model["text"] = {**given, **files}
    return model


def load_text_tower(mcfg: contrastive.ContrastiveConfig, mesh: Mesh, rules: sharding.Rules) -> dict[str, jax.Array]:
    """{'text/...': array} read from `text_pretrained` (an HF `BertModel` directory) into its shards, for stage 1
    to start from a pretrained text encoder; empty without one."""
    if not mcfg.text_pretrained:
        return {}
    abstract = nnx.eval_shape(lambda: contrastive.ContrastiveModel(mcfg, rngs=nnx.Rngs(0)))
    shardings = sharding.state_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    state = hf_bert.load_bert_state(
        mcfg.text_pretrained, nnx.state(abstract.text, nnx.Param), mcfg.text, shardings=shardings["text"]
    )
    return {
        load.path_str(("text", *p)): var.get_value() if hasattr(var, "get_value") else var.value
        for p, var in nnx.to_flat_state(state)
    }


def _report(prefix: str, given: Mapping[str, Any], files: Mapping[str, Any], source: str) -> None:
    def norm(v: Any) -> Any:
        return tuple(v) if isinstance(v, list | tuple) else v

    changed = [
        f"{prefix}.{k}={given[k]!r} -> {files[k]!r}"
        for k in sorted(files)
        if given.get(k) is not None and norm(given[k]) != norm(files[k])
    ]
    if changed:
        logging.warning("%s: the pretrained tower's own settings replace the config's: %s", source, ", ".join(changed))


def _resolve_lm(path: str, lm: dict[str, Any]) -> dict[str, Any]:
    hf = hf_lm.lm_config_from_hf(path, num_added_tokens=lm.get("num_added_tokens", 3))
    _report("model.lm", {k: v for k, v in lm.items() if k not in _LM_OWN}, hf, f"{path}/config.json")
    return {**hf, **{k: lm[k] for k in _LM_OWN if k in lm}}


def _resolve_vision(path: str, vision: dict[str, Any]) -> dict[str, Any]:
    kind = vision.get("kind", "nfnet")
    given = dict(vision)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model.vision_pretrained={path!r} does not exist")
    if p.is_dir():
        if kind != "clip_vit":
            raise ValueError(
                f"model.vision_pretrained={path!r} is a directory (a Hugging Face CLIP tower) but "
                f"model.vision.kind={kind!r}: set model.vision.kind='clip_vit', or point at an NFNet file"
            )
        vit = hf_clip.vit_config_from_hf(path)
        mean, std = hf_clip.image_stats(path)
        files = dict(
            image_size=vit.image_size,
            patch_size=vit.patch_size,
            width=vit.width,
            num_layers=vit.num_layers,
            num_heads=vit.num_heads,
            mlp_dim=vit.mlp_dim,
            activation=vit.act,
            norm_eps=vit.norm_eps,
            mean=mean,
            std=std,
        )
        source = f"{path}/config.json, preprocessor_config.json"
    else:
        if kind != "nfnet":
            raise ValueError(
                f"model.vision_pretrained={path!r} is a file (a converted NFNet) but model.vision.kind={kind!r}"
            )
        arch, activation = nfnet_convert.read_metadata(path)
        mean, std = nfnet_convert.image_stats(path)
        files = dict(
            widths=tuple(arch["widths"]),
            depths=tuple(arch["depths"]),
            stem_widths=tuple(arch["stem_widths"]),
            group_size=int(arch["group_size"]),
            activation=activation,
            mean=mean,
            std=std,
        )
        source = f"{path} (metadata)"
        # The config may name the architecture by variant: compare what it resolves to, not the spelling.
        if given.get("variant") and not given.get("widths"):
            widths, depths, _ = nfnet.resolve_architecture(given["variant"], None, None, None)
            given.update(widths=widths, depths=depths)
        vision["variant"] = None
    _report("model.vision", given, files, source)
    return {**vision, **files}


# ---------------------------------------------------------------------------------------------------------------
# Start checks.
_HOW = {
    "lm": ("model.lm_pretrained", "a Hugging Face LM directory (config.json and *.safetensors)"),
    "vision": (
        "model.vision_pretrained",
        "an NFNet file from `python -m flamingo_jax.pretrained.nfnet_convert` or a Hugging Face CLIP directory",
    ),
}


def check_random_towers(mcfg: flamingo.FlamingoConfig, frozen_paths: Iterable[str]) -> None:
    """Fails when a tower has frozen parameters and no pretrained weights (it would stay random), unless
    `model.allow_random_towers`. `frozen_paths` are the frozen parameters' '/'-joined paths."""
    if mcfg.allow_random_towers:
        return
    frozen_paths = list(frozen_paths)
    problems = []
    for tower, (field, how) in _HOW.items():
        if getattr(mcfg, f"{tower}_pretrained"):
            continue
        frozen = [p for p in frozen_paths if p.split("/")[0] == tower]
        if frozen:
            problems.append(
                f"the {tower} tower is frozen ({len(frozen)} parameters, e.g. {frozen[0]}) but {field} is empty, "
                f"so it would stay random: set {field} to {how}"
            )
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Or set model.allow_random_towers=True to train against random frozen towers "
            "on purpose (tests, toy runs), or make the tower trainable (model.trainable)."
        )


def check_tokenizer(tok: Tokenizer, mcfg: flamingo.FlamingoConfig) -> None:
    """Fails, naming both sides, if the tokenizer's special ids are not the model's: `<image>`,
    `<|endofchunk|>` and pad against the LM's rows, and EOS/BOS against the pretrained LM's config.json."""
    lm = mcfg.lm
    where = f"{mcfg.lm_pretrained}/config.json" if mcfg.lm_pretrained else "config.model.lm"
    tok.check_model_ids(
        mcfg.image_token_id, lm.num_added_tokens, what=f"the model (vocab_size={lm.vocab_size} in {where})"
    )
    if not mcfg.lm_pretrained:
        return
    ids = hf_lm.special_token_ids(mcfg.lm_pretrained)
    problems = []
    if ids["eos"] and tok.eos_id not in ids["eos"]:
        problems.append(f"end of sequence is id {tok.eos_id} in the tokenizer but eos_token_id={ids['eos']} in {where}")
    if tok.adds_bos and ids["bos"] is not None and tok.bos_id != ids["bos"]:
        problems.append(f"BOS is id {tok.bos_id} in the tokenizer but bos_token_id={ids['bos']} in {where}")
    if problems:
        raise TokenizerError(f"Tokenizer {tok.path!r} does not match the pretrained LM: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Loading.
def pretrained_towers(mcfg: flamingo.FlamingoConfig) -> tuple[str, ...]:
    """The top-level parameter subtrees ('lm', 'vision') that `load_towers` fills."""
    return tuple(t for t in ("lm", "vision") if getattr(mcfg, f"{t}_pretrained"))


def load_towers(mcfg: flamingo.FlamingoConfig, mesh: Mesh, rules: sharding.Rules) -> dict[str, jax.Array]:
    """{'/'-joined parameter path: array} for every parameter of the configured pretrained towers.

    Each array is read shard by shard onto the mesh (no host holds a whole tensor it does not own) and cast, per
    block, to its final dtype: `frozen_param_dtype` for frozen weights, `param_dtype` for trainable ones (the
    added token rows). Nothing else is allocated: no float32 copy, no random copy. Empty without towers.
    """
    towers = pretrained_towers(mcfg)
    if not towers:
        return {}
    abstract = nnx.eval_shape(lambda: flamingo.Flamingo(mcfg, rngs=nnx.Rngs(0)))
    shardings = sharding.state_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    is_trainable = flamingo.trainable_filter(mcfg.trainable)
    frozen_dtype = jnp.dtype(mcfg.frozen_param_dtype)

    def target(tower: str) -> nnx.State:
        flat = []
        for path, var in nnx.to_flat_state(nnx.state(getattr(abstract, tower), nnx.Param)):
            v = var.get_value() if hasattr(var, "get_value") else var.value
            cast = not is_trainable((tower, *path), var) and jnp.issubdtype(v.dtype, jnp.floating)
            flat.append((path, var.replace(jax.ShapeDtypeStruct(v.shape, frozen_dtype if cast else v.dtype))))
        return nnx.from_flat_state(flat)

    loaded: dict[str, nnx.State] = {}
    if "lm" in towers:
        loaded["lm"] = hf_lm.load_lm_state(mcfg.lm_pretrained, target("lm"), mcfg.lm, shardings=shardings["lm"])
    if "vision" in towers:
        if mcfg.vision.kind == "clip_vit":
            loaded["vision"] = hf_clip.load_clip_state(
                mcfg.vision_pretrained, target("vision"), mcfg.vision.vit_config(), shardings=shardings["vision"]
            )
        else:
            loaded["vision"] = nfnet_convert.load_nfnet_state(
                mcfg.vision_pretrained, target("vision"), shardings=shardings["vision"]
            )
    out = {}
    for tower, state in loaded.items():
        for path, var in nnx.to_flat_state(state):
            out[load.path_str((tower, *path))] = var.get_value() if hasattr(var, "get_value") else var.value
    return out


def replace_leaves(tree: dict, values: Mapping[str, Any]) -> tuple[dict, set[str]]:
    """A copy of a nested dict with the leaves at `values`' '/'-joined paths replaced (cast to the leaf's dtype
    where it differs), and the set of paths it used."""
    used = set()

    def walk(node: Any, prefix: tuple) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*prefix, k)) for k, v in node.items()}
        key = load.path_str(prefix)
        if key in values:
            used.add(key)
            v = values[key]
            return v if v.dtype == node.dtype else v.astype(node.dtype)
        return node

    return walk(tree, ()), used
