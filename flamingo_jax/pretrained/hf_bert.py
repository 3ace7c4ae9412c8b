"""BERT text towers from local Hugging Face-format directories.

Accepts a bare `BertModel` directory or a `BertForPreTraining` / `BertForMaskedLM` one, whose tensors carry a
`bert.` prefix (the `cls.*` heads are then ignored; `BertForMaskedLM` saves no pooler, so load it with
`pool='mean'`). Mapping onto `models.text_encoder.TextEncoder` (`L.` = `encoder.layer.i.`, stacked over i):

    embeddings.word_embeddings.weight [V, D]            token_embed [V, D]
    embeddings.position_embeddings.weight [N, D]        pos_embed [N, D]
    embeddings.token_type_embeddings.weight [T, D]      type_embed [T, D]
    embeddings.LayerNorm                                 embed_norm
    L.attention.self.{query,key,value} [D, D]           layers/{q,k,v}/kernel [D, H, hd]
    L.attention.output.dense [D, D]                      layers/o/kernel [H, hd, D]
    L.attention.output.LayerNorm                         layers/attn_norm
    L.intermediate.dense / L.output.dense                layers/fc1 / layers/fc2
    L.output.LayerNorm                                   layers/mlp_norm
    pooler.dense [D, D]                                  pooler/kernel [D, D] (in, out)

LayerNorm parameters are `weight`/`bias` (or the TF-era `gamma`/`beta`) -> `scale`/`bias`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from flamingo_jax import sharding as sharding_lib
from flamingo_jax.models import text_encoder
from flamingo_jax.pretrained import load

# HF `hidden_act` -> layers.ACTIVATIONS. HF's "gelu" is the exact erf form; the other two are the tanh form.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def text_config_from_hf(path: str | Path) -> text_encoder.TextConfig:
    f = Path(path) / "config.json"
    if not f.exists():
        raise load.CheckpointError(f"{f} does not exist: an HF BERT directory needs its config.json")
    hf: dict[str, Any] = json.loads(f.read_text())
    if hf.get("model_type") != "bert":
        # RoBERTa & co. differ in ways the weights do not show (position ids offset by the padding id).
        raise load.CheckpointError(f"{f}: model_type {hf.get('model_type')!r} is not a BERT model")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise load.CheckpointError(f"{f}: hidden_act {act!r} is not supported; choose one of {sorted(_ACTIVATIONS)}")
    positions = hf.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise load.CheckpointError(
            f"{f}: position_embedding_type {positions!r} is not supported; only 'absolute' (learned) positions are"
        )
    if hf.get("is_decoder"):
        raise load.CheckpointError(f"{f}: is_decoder=true (causal attention); the text encoder is bidirectional")
    # Defaults are BertConfig's (bert-base-uncased), for the keys a saved config may omit.
    return text_encoder.TextConfig(
        vocab_size=int(hf.get("vocab_size", 30522)),
        num_layers=int(hf.get("num_hidden_layers", 12)),
        dim=int(hf.get("hidden_size", 768)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        mlp_dim=int(hf.get("intermediate_size", 3072)),
        max_len=int(hf.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        norm="post",
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        activation=_ACTIVATIONS[act],
        pool="cls",
    )


def bert_sources(cfg: text_encoder.TextConfig, names: Collection[str]) -> tuple[dict[str, Any], list[str]]:
    """(parameter path -> Source, regexes of checkpoint tensors to ignore) for a post-norm TextEncoder."""
    if cfg.norm != "post":
        raise load.CheckpointError(f"BERT checkpoints are post-norm; the model has norm={cfg.norm!r}")
    probe = "embeddings.word_embeddings.weight"
    prefix = next((p for p in ("bert.", "") if p + probe in names), None)
    if prefix is None:
        raise load.CheckpointError(f"no tensor {probe!r} or 'bert.{probe}': not a BERT checkpoint")
    p, n = prefix, cfg.num_layers
    layer = p + "encoder.layer.{}."

    # Checkpoints converted from TF name the LayerNorm parameters gamma/beta.
    w, b = ("gamma", "beta") if p + "embeddings.LayerNorm.gamma" in names else ("weight", "bias")
    per_layer = lambda suffix, **kw: load.stack(lambda i: load.View(layer.format(i) + suffix, **kw), n)
    lin = lambda suffix, n_in: load.stack(lambda i: load.torch_linear(layer.format(i) + suffix, n_in, 3), n)
    src: dict[str, Any] = {
        "token_embed": load.View(p + "embeddings.word_embeddings.weight"),
        "pos_embed": load.View(p + "embeddings.position_embeddings.weight"),
        "layers/q/kernel": lin("attention.self.query.weight", 1),
        "layers/k/kernel": lin("attention.self.key.weight", 1),
        "layers/v/kernel": lin("attention.self.value.weight", 1),
        "layers/o/kernel": lin("attention.output.dense.weight", 2),
        "layers/o/bias": per_layer("attention.output.dense.bias"),
        "layers/fc1/kernel": per_layer("intermediate.dense.weight", groups=((1,), (0,))),
        "layers/fc1/bias": per_layer("intermediate.dense.bias"),
        "layers/fc2/kernel": per_layer("output.dense.weight", groups=((1,), (0,))),
        "layers/fc2/bias": per_layer("output.dense.bias"),
    }
    if cfg.type_vocab_size:
        src["type_embed"] = load.View(p + "embeddings.token_type_embeddings.weight")
    src["embed_norm/scale"] = load.View(p + f"embeddings.LayerNorm.{w}")
    src["embed_norm/bias"] = load.View(p + f"embeddings.LayerNorm.{b}")
    for x, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        src[f"layers/{x}/bias"] = load.stack(
            lambda i, theirs=theirs: load.merged(layer.format(i) + f"attention.self.{theirs}.bias", 2), n
        )
    for ours, theirs in (("attn_norm", "attention.output.LayerNorm"), ("mlp_norm", "output.LayerNorm")):
        src[f"layers/{ours}/scale"] = per_layer(f"{theirs}.{w}")
        src[f"layers/{ours}/bias"] = per_layer(f"{theirs}.{b}")
    # position_ids: a buffer older checkpoints saved. Under a `bert.` prefix everything else (the `cls.*`
    # pretraining heads) belongs to other models.
    ignore = [r"(.*\.)?embeddings\.position_ids"]
    if prefix:
        ignore.append(r"(?!bert\.).*")
    if cfg.pool == "cls":
        pooler = p + "pooler.dense.weight"
        if pooler not in names:
            raise load.CheckpointError(
                f"tensor {pooler!r} (the pooler that pool='cls' needs) is missing; BertForMaskedLM checkpoints "
                f"have none: load them with pool='mean'"
            )
        src["pooler/kernel"] = load.torch_linear(pooler, 1, 2)
        src["pooler/bias"] = load.View(p + "pooler.dense.bias")
    else:
        # Mean pooling was asked for: a pooler in the checkpoint is deliberately left out.
        ignore.append(re.escape(p) + r"pooler\.dense\.(weight|bias)")
    return src, ignore


def load_bert_state(
    path: str | Path,
    abstract_state: nnx.State,
    cfg: text_encoder.TextConfig,
    *,
    shardings: nnx.State | None = None,
) -> nnx.State:
    """The `TextEncoder` state read from an HF BERT dir, shard by shard, cast to the abstract dtypes."""
    with load.TensorReader(path) as reader:
        sources, ignore = bert_sources(cfg, reader.names)
        return load.load_state(reader, abstract_state, sources, shardings=shardings, ignore=ignore)


def load_bert(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    remat: str = "none",
    pool: str = "cls",
) -> text_encoder.TextEncoder:
    """A `TextEncoder` with the HF directory's architecture and weights. `pool='mean'` skips the pooler (which
    `BertForMaskedLM` directories do not have)."""
    cfg = dataclasses.replace(text_config_from_hf(path), pool=pool)
    cfg.validate()

    def make() -> text_encoder.TextEncoder:
        return text_encoder.TextEncoder(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))

    return load.load_module(make, path, lambda _, reader: bert_sources(cfg, reader.names), mesh=mesh, rules=rules)
