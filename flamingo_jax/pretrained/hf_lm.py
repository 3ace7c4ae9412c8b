"""Frozen decoder LMs from local Hugging Face-format directories (LLaMA/Qwen2/Mistral and GPT-2 families).

A directory holds `config.json` and one `model.safetensors` or several shards with
`model.safetensors.index.json` (tokenizer files are read elsewhere). `lm_config_from_hf` turns the HF config
into our `LMConfig` fields; `lm_sources` maps HF tensor names onto the `DecoderLM` parameter tree:

    HF (torch Linear weight [out, in])           ours (DenseGeneral kernel [in..., out...])
    q_proj [H*hd, D] / k_proj, v_proj [Hkv*hd, D] attn/q|k|v/kernel [D, H|Hkv, hd]   (transpose + head split)
    o_proj [D, H*hd]                              attn/o/kernel [H, hd, D]
    gate/up_proj [F, D], down_proj [D, F]         mlp/gate|up/kernel [D, F], mlp/down/kernel [F, D]
    embed_tokens [V, D]                           embed/base [V, D]; embed/added = mean of the rows
    lm_head [V, D]  (absent when tied)            head/base [D, V]; head/added = mean of the rows, transposed
    GPT-2 Conv1D weights are already [in, out]; c_attn [D, 3D] is fused q|k|v, split by column offset.

HF's rotary embedding uses the same half-split layout as ours, so q/k need no permutation. Its RoPE scaling
(`rope_parameters` in transformers 5, `rope_scaling` in 4.x) becomes `LMConfig.rope_scaling` (models/rope.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from flamingo_jax import sharding as sharding_lib
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.models import rope as rope_lib
from flamingo_jax.pretrained import load

LLAMA_LIKE = ("llama", "qwen2", "mistral")

# HF activation names -> ours. gelu_fast/quick_gelu approximations differ from both of ours: rejected.
_ACTS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}

# Buffers some (older) checkpoints carry that are not parameters: rotary caches, GPT-2's causal-mask buffers.
_LLAMA_BUFFERS = (r"(.*\.)?rotary_emb\.inv_freq",)
_GPT2_BUFFERS = (r"(.*\.)?h\.\d+\.attn\.(masked_)?bias",)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "config.json"
    if not f.exists():
        raise load.CheckpointError(f"{f} does not exist: an HF LM directory needs its config.json")
    return json.loads(f.read_text())


def _act(hf: dict[str, Any], key: str, default: str) -> str:
    name = hf.get(key) or default
    if name not in _ACTS:
        raise ValueError(f"HF config {key}={name!r} has no equivalent here; supported: {sorted(_ACTS)}")
    return _ACTS[name]


def _rope(hf: dict[str, Any], path: str | Path) -> tuple[float, dict[str, Any]]:
    """(rope_theta, rope_scaling) for `LMConfig`; an unsupported scaling fails naming its type."""
    # transformers 5 nests rope settings in `rope_parameters`; 4.x had `rope_theta` and `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"{path}: HF config has per-layer-type rope parameters ({sorted(params)}); not supported")
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    partial = params.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ValueError(f"{path}: partial_rotary_factor={partial}: only full-width rotary is implemented")
    if kind == "default":
        return theta, {}
    rope_lib.check_type(kind, f"{path}/config.json")
    if kind in ("llama3", "yarn"):
        # As transformers: a top-level value (Phi-3) wins, then the rope dict's, then max_position_embeddings.
        params["original_max_position_embeddings"] = int(
            hf.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or hf["max_position_embeddings"]
        )
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = hf["max_position_embeddings"] / params["original_max_position_embeddings"]
    # Unset optional parameters take transformers' defaults (it reads them with .get(...) or a fallback).
    return theta, {"rope_type": kind, **{k: v for k, v in params.items() if v is not None}}


def lm_config_from_hf(path: str | Path, *, num_added_tokens: int = 3) -> dict[str, Any]:
    """`LMConfig` fields (a plain dict, fit for `config.model.lm`) read from an HF directory's config.json."""
    hf = read_hf_config(path)
    model_type = hf.get("model_type")
    if model_type in LLAMA_LIKE:
        heads = int(hf["num_attention_heads"])
        dim = int(hf["hidden_size"])
        attention_bias = bool(hf.get("attention_bias", False))
        theta, scaling = _rope(hf, path)
        window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
        if window:
            logging.warning(
                "%s: sliding-window attention (window %s) is not implemented; sequences longer "
                "than the window will differ from the reference model",
                path,
                window,
            )
        return dict(
            family="llama",
            vocab_size=int(hf["vocab_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            dim=dim,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or dim // heads),
            mlp_dim=int(hf["intermediate_size"]),
            norm="rms",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            mlp_act=_act(hf, "hidden_act", "silu"),
            gated_mlp=True,
            # Qwen2 always has q/k/v biases and no o bias; LLaMA's attention_bias covers all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            out_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            positions="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            max_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            num_added_tokens=num_added_tokens,
        )
    if model_type == "gpt2":
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError(
                "GPT-2 variants with scale_attn_weights=False or scale_attn_by_inverse_layer_idx are not supported"
            )
        dim, heads = int(hf["n_embd"]), int(hf["n_head"])
        return dict(
            family="gpt2",
            vocab_size=int(hf["vocab_size"]),
            num_layers=int(hf["n_layer"]),
            dim=dim,
            num_heads=heads,
            head_dim=dim // heads,
            mlp_dim=int(hf.get("n_inner") or 4 * dim),
            norm="layer",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            mlp_act=_act(hf, "activation_function", "gelu_new"),
            gated_mlp=False,
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            positions="learned",
            max_len=int(hf.get("n_positions", 1024)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            num_added_tokens=num_added_tokens,
        )
    raise ValueError(f"{path}: HF model_type {model_type!r} is not supported; choose one of {[*LLAMA_LIKE, 'gpt2']}")


def _prefix(names: Collection[str], candidates: tuple[str, ...], probe: str) -> str:
    """The name prefix of the base model ('model.' for *ForCausalLM, '' for a bare *Model)."""
    for p in candidates:
        if p + probe in names:
            return p
    raise load.CheckpointError(
        f"no tensor {probe!r} (under any of the prefixes {list(candidates)}): not an HF checkpoint of this family"
    )


def _norm_sources(prefix: str, hf_norm: str, ours: str, cfg: lm_lib.LMConfig, n: int | None) -> dict[str, Any]:
    """Our norm `ours` (scale [+ bias]) from HF `hf_norm.weight` [+ `.bias`]; stacked over n layers."""
    keys = [("scale", "weight")] + ([("bias", "bias")] if cfg.norm == "layer" else [])
    out: dict[str, Any] = {}
    for mine, theirs in keys:
        if n is None:
            out[f"{ours}/{mine}"] = load.View(f"{prefix}{hf_norm}.{theirs}")
        else:
            out[f"{ours}/{mine}"] = load.stack(lambda i, t=theirs: load.View(f"{prefix}{hf_norm.format(i)}.{t}"), n)
    return out


def _llama_sources(cfg: lm_lib.LMConfig, names: Collection[str]) -> tuple[dict[str, Any], list[str]]:
    p = _prefix(names, ("model.", ""), "embed_tokens.weight")
    n = cfg.num_layers
    lin = lambda tmpl, n_in, ndim: load.stack(lambda i: load.torch_linear(p + tmpl.format(i), n_in, ndim), n)
    bias = lambda tmpl, ndim: load.stack(lambda i: load.merged(p + tmpl.format(i), ndim), n)
    att, mlp = "layers.{}.self_attn.", "layers.{}.mlp."
    src: dict[str, Any] = {
        "embed/base": load.View(f"{p}embed_tokens.weight"),
        "embed/added": load.RowMean(f"{p}embed_tokens.weight"),
        "layers/attn/q/kernel": lin(att + "q_proj.weight", 1, 3),
        "layers/attn/k/kernel": lin(att + "k_proj.weight", 1, 3),
        "layers/attn/v/kernel": lin(att + "v_proj.weight", 1, 3),
        "layers/attn/o/kernel": lin(att + "o_proj.weight", 2, 3),
        "layers/mlp/gate/kernel": lin(mlp + "gate_proj.weight", 1, 2),
        "layers/mlp/up/kernel": lin(mlp + "up_proj.weight", 1, 2),
        "layers/mlp/down/kernel": lin(mlp + "down_proj.weight", 1, 2),
        **_norm_sources(p, "layers.{}.input_layernorm", "layers/attn_norm", cfg, n),
        **_norm_sources(p, "layers.{}.post_attention_layernorm", "layers/mlp_norm", cfg, n),
        **_norm_sources(p, "norm", "final_norm", cfg, None),
    }
    if cfg.qkv_bias:
        for x in "qkv":
            src[f"layers/attn/{x}/bias"] = bias(att + f"{x}_proj.bias", 2)
    if cfg.out_bias:
        src["layers/attn/o/bias"] = bias(att + "o_proj.bias", 1)
    if cfg.mlp_bias:
        for x in ("gate", "up", "down"):
            src[f"layers/mlp/{x}/bias"] = bias(mlp + f"{x}_proj.bias", 1)
    ignore = list(_LLAMA_BUFFERS)
    if cfg.tie_embeddings:
        # Some tied checkpoints still store the (identical) head; HF ignores it too.
        ignore.append("lm_head.weight")
    else:
        src["head/base"] = load.View("lm_head.weight", groups=((1,), (0,)))
        src["head/added"] = load.RowMean("lm_head.weight", transposed=True)
    return src, ignore


def _gpt2_sources(cfg: lm_lib.LMConfig, names: Collection[str]) -> tuple[dict[str, Any], list[str]]:
    p = _prefix(names, ("transformer.", ""), "wte.weight")
    n, d = cfg.num_layers, cfg.dim
    hd = cfg.num_heads * cfg.head_dim
    h = "h.{}."
    src: dict[str, Any] = {
        "embed/base": load.View(f"{p}wte.weight"),
        "embed/added": load.RowMean(f"{p}wte.weight"),
        "pos_embed": load.View(f"{p}wpe.weight"),
        # Conv1D weights are [in, out]: the same order as our kernels, only the head dims are merged.
        "layers/attn/o/kernel": load.stack(
            lambda i: load.View(f"{p}{h.format(i)}attn.c_proj.weight", groups=((0, 1), (2,))), n
        ),
        "layers/attn/o/bias": load.stack(lambda i: load.View(f"{p}{h.format(i)}attn.c_proj.bias"), n),
        "layers/mlp/up/kernel": load.stack(lambda i: load.View(f"{p}{h.format(i)}mlp.c_fc.weight"), n),
        "layers/mlp/up/bias": load.stack(lambda i: load.View(f"{p}{h.format(i)}mlp.c_fc.bias"), n),
        "layers/mlp/down/kernel": load.stack(lambda i: load.View(f"{p}{h.format(i)}mlp.c_proj.weight"), n),
        "layers/mlp/down/bias": load.stack(lambda i: load.View(f"{p}{h.format(i)}mlp.c_proj.bias"), n),
        **_norm_sources(p, "h.{}.ln_1", "layers/attn_norm", cfg, n),
        **_norm_sources(p, "h.{}.ln_2", "layers/mlp_norm", cfg, n),
        **_norm_sources(p, "ln_f", "final_norm", cfg, None),
    }
    for j, x in enumerate("qkv"):
        # c_attn is [D, 3*H*hd] = [q | k | v] along the columns.
        src[f"layers/attn/{x}/kernel"] = load.stack(
            lambda i, j=j: load.View(
                f"{p}{h.format(i)}attn.c_attn.weight",
                groups=((0,), (1, 2)),
                offsets=(0, j * hd),
                source_shape=(d, 3 * hd),
            ),
            n,
        )
        src[f"layers/attn/{x}/bias"] = load.stack(
            lambda i, j=j: load.merged(f"{p}{h.format(i)}attn.c_attn.bias", 2, offset=j * hd, source_shape=(3 * hd,)),
            n,
        )
    ignore = [*_GPT2_BUFFERS, "lm_head.weight"] if cfg.tie_embeddings else list(_GPT2_BUFFERS)
    if not cfg.tie_embeddings:
        src["head/base"] = load.View("lm_head.weight", groups=((1,), (0,)))
        src["head/added"] = load.RowMean("lm_head.weight", transposed=True)
    return src, ignore


def lm_sources(cfg: lm_lib.LMConfig, names: Collection[str]) -> tuple[dict[str, Any], list[str]]:
    """(parameter path -> Source, regexes of checkpoint tensors to ignore) for a DecoderLM from `cfg`."""
    if cfg.family == "gpt2":
        return _gpt2_sources(cfg, names)
    if cfg.family == "llama":
        return _llama_sources(cfg, names)
    raise ValueError(f"no HF mapping for LM family {cfg.family!r}")


def load_lm_state(
    path: str | Path, abstract_state: nnx.State, cfg: lm_lib.LMConfig, *, shardings: nnx.State | None = None
) -> nnx.State:
    """The `DecoderLM` state (e.g. `nnx.state(abstract_flamingo.lm)`) read from an HF dir, shard by shard.

    `shardings` is the matching state of NamedShardings (`sharding.state_shardings`); values are cast to the
    abstract state's dtypes (e.g. bfloat16 frozen weights, float32 added rows).
    """
    with load.TensorReader(path) as reader:
        sources, ignore = lm_sources(cfg, reader.names)
        return load.load_state(reader, abstract_state, sources, shardings=shardings, ignore=ignore)


def load_lm(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    attention_impl: str = "xla",
    remat: str = "none",
    overrides: Mapping[str, Any] | None = None,
) -> lm_lib.DecoderLM:
    """A `DecoderLM` with the HF directory's architecture and weights (plus mean-initialised added rows).

    `overrides` replaces LMConfig fields read from config.json (e.g. `num_added_tokens`, `max_len`).
    """
    cfg = lm_lib.LMConfig.from_dict({**lm_config_from_hf(path), **(overrides or {})})

    def make() -> lm_lib.DecoderLM:
        return lm_lib.DecoderLM(
            cfg,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_impl=attention_impl,
            remat=remat,
            rngs=nnx.Rngs(0),
        )

    return load.load_module(make, path, lambda _, reader: lm_sources(cfg, reader.names), mesh=mesh, rules=rules)


def special_token_ids(path: str | Path) -> dict[str, Any]:
    """{'bos': id or None, 'eos': [ids]} from an HF LM directory's config.json (`eos_token_id` may be a list)."""
    hf = read_hf_config(path)
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    bos = hf.get("bos_token_id")
    return {"bos": None if bos is None else int(bos), "eos": eos}
