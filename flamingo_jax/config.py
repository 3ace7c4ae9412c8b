"""The config schema shared by every file in `configs/`, and its validation.

`base_config()` holds every field with its default; a config file changes what differs. `validate(config)`
runs before anything is allocated and names the field that is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from flamingo_jax import sharding
from flamingo_jax.data.loader import default_dataset_config
from flamingo_jax.models.contrastive import ContrastiveConfig
from flamingo_jax.models.flamingo import DEFAULT_TRAINABLE, FlamingoConfig
from flamingo_jax.pretrained import towers

# The paper's mixture: name -> (kind, lambda_m).
PAPER_MIXTURE = {
    "m3w": ("interleaved", 1.0),
    "ltip": ("pairs", 0.2),
    "vtp": ("video", 0.03),
    "align": ("pairs", 0.2),
}


def chinchilla_lm(
    num_layers: int, dim: int, num_heads: int, vocab_size: int = 32000, max_len: int = 2048
) -> dict[str, Any]:
    """A Chinchilla-style LM (DESIGN.md section 1): RMSNorm, GELU FFN 4x, rotary positions, untied."""
    return dict(
        family="chinchilla",
        vocab_size=vocab_size,
        num_layers=num_layers,
        dim=dim,
        num_heads=num_heads,
        head_dim=dim // num_heads,
        mlp_dim=4 * dim,
        max_len=max_len,
    )


STAGES = ("flamingo", "contrastive")


def nfnet_f6(image_size: int) -> dict[str, Any]:
    """The paper's vision tower: NFNet-F6 (`model.vision`)."""
    return dict(
        kind="nfnet",
        variant="F6",
        widths=None,
        depths=None,
        stem_widths=None,
        group_size=128,
        image_size=image_size,
        # None: the tower's own statistics and activation (its files', when vision_pretrained is set).
        mean=None,
        std=None,
        activation=None,
        stochdepth_rate=0.1,
    )


def contrastive_model(image_size: int = 288) -> ml_collections.ConfigDict:
    """Stage 1's dual encoder (paper, B.1.3): NFNet-F6 from scratch at 288 px and a BERT-base-sized text encoder,
    both projected to a 1376-d joint space. A stage-1 config sets `c.stage = 'contrastive'` and `c.model` to this."""
    return ml_collections.ConfigDict(
        dict(
            vision=nfnet_f6(image_size),
            text=dict(
                vocab_size=32000,
                num_layers=12,
                dim=768,
                num_heads=12,
                mlp_dim=3072,
                max_len=512,
                type_vocab_size=0,
                norm="post",
                norm_eps=1e-12,
                activation="gelu",
                pool="cls",
            ),
            text_pretrained="",  # an HF BertModel directory to start the text tower from (optional)
            embed_dim=1376,
            init_inverse_temperature=1 / 0.07,
            max_inverse_temperature=100.0,
            trainable=(".*",),
            dtype="bfloat16",
            param_dtype="float32",
            frozen_param_dtype="bfloat16",
            remat="none",
            attention="xla",
        )
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # 'flamingo': stage 2, the paper's main training (token NLL over the mixture). 'contrastive': stage 1, the
    # vision encoder pretrained with a text encoder on image-text pairs (`contrastive_model()` as `model`).
    c.stage = "flamingo"

    c.model = ml_collections.ConfigDict(
        dict(
            vision=nfnet_f6(320),
            resampler=dict(num_layers=6, num_latents=64, num_heads=16, head_dim=128, ffw_mult=4, max_frames=8),
            xattn=dict(every=1, num_heads=16, head_dim=128, ffw_mult=4, gate_init=0.0),
            lm=chinchilla_lm(24, 2048, 16),
            trainable=DEFAULT_TRAINABLE,
            # Trainable weights and optimiser state in float32; compute and frozen weights in bfloat16 (paper).
            dtype="bfloat16",
            param_dtype="float32",
            frozen_param_dtype="bfloat16",
            remat="none",
            attention="xla",
            # Frozen towers: an HF LM directory, and an NFNet file (nfnet_convert) or HF CLIP directory. Their
            # files decide the towers' architecture and preprocessing (see flamingo_jax.pretrained.towers).
            lm_pretrained="",
            vision_pretrained="",
            allow_random_towers=False,  # True: frozen towers may stay random (tests, toy runs)
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            tokenizer="",  # SentencePiece .model or Hugging Face tokenizer.json
            worker_count=0,  # Grain worker processes per host
            # The built-in synthetic data: generated under `root` and built on first use when enabled.
            synthetic=dict(enabled=False, root="", seed=0, num_train=2000, num_eval=200, image_size=64, vocab_size=512),
        )
    )
    c.data.datasets = ml_collections.ConfigDict()
    for name, (kind, weight) in PAPER_MIXTURE.items():
        ds = default_dataset_config(kind)
        ds.weight = weight
        with ds.unlocked():
            ds.micro_batches = 1  # gradient accumulation within the dataset's batch, for memory
        c.data.datasets[name] = ds

    c.train = ml_collections.ConfigDict(
        dict(
            steps=500_000,
            strategy="accumulate",  # 'accumulate' (paper) | 'round_robin' | 'merged' (ablations)
            log_every=100,
            eval_every=5000,  # 0: no evaluation
            eval_batches=10,  # per dataset
            peak_flops=0.0,  # per device, for MFU; 0: vendor table, or measured on CPU
            max_consecutive_skips=10,
        )
    )
    # Stage 1's zero-shot classification: an ImageNet-style folder (one sub-directory per class, named by the
    # class) and the prompt templates its class names are put into ('{}' -> 'red circle').
    c.eval = ml_collections.ConfigDict(dict(zeroshot=dict(data_dir="", prompts=("{}",), batch_size=64)))
    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=1e-4,
            schedule="warmup_constant",
            warmup_steps=5000,
            end_lr=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            clip_norm=1.0,
            weight_decay=0.1,
            # No decay on the resampler (paper), norms, biases and gates.
            no_decay=("resampler/.*", ".*norm.*", ".*bias", ".*_gate"),
        )
    )

    # The ('data', 'fsdp', 'tensor') device mesh; -1 takes the remaining devices.
    c.mesh = (-1, 1, 1)
    c.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    c.seed = 0
    # WORKDIR/checkpoints: the train state and data iterators (not the frozen weights, which are re-created from
    # `seed` or the pretrained towers). A run resumes from its workdir's newest usable checkpoint.
    c.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=1000,  # 0: only at the end (and on preemption)
            keep=3,  # the newest `keep` checkpoints ...
            keep_every=0,  # ... plus every step divisible by this (0: none)
            init_from="",  # fine-tuning: another run's workdir or step dir; parameters only
            async_save=True,  # write in the background while training continues
        )
    )
    return c


def model_config(config: ml_collections.ConfigDict) -> FlamingoConfig | ContrastiveConfig:
    """The typed model config of the config's stage; Flamingo's with the pretrained towers' settings read from
    their files."""
    if config.get("stage", "flamingo") == "contrastive":
        return ContrastiveConfig.from_dict(towers.resolve_text(config.model.to_dict()))
    return FlamingoConfig.from_dict(towers.resolve(config.model.to_dict()))


def validate(config: ml_collections.ConfigDict) -> FlamingoConfig:
    """Checks everything that can be checked without devices or data; returns the typed model config."""
    if config.get("stage", "flamingo") not in STAGES:
        raise ValueError(f"config.stage: {config.stage!r}; choose one of {STAGES}")
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


def validate_mesh(config: ml_collections.ConfigDict, mcfg: FlamingoConfig, mesh_shape: Mapping[str, int]) -> None:
    """Checks every size the mesh must divide, before any array exists; names the config field at fault.

    `mesh_shape` is the resolved mesh ({'data': 2, 'fsdp': 4, 'tensor': 1}); the number of shards of each logical
    axis follows from `config.sharding.rules`, so a custom layout is checked against its own rules. Parameter
    dims not listed here are still checked, by name, when the sharded state is planned (`sharding.state_shardings`).
    """
    rules = sharding.rules_from_config(config.sharding.rules)
    mesh_desc = ", ".join(f"{k}={v}" for k, v in mesh_shape.items())
    problems = []

    def need(field: str, value: int, logical: str) -> None:
        shards = sharding.axis_size(rules, mesh_shape, logical)
        if value % shards:
            axes = sharding.rule_table(rules)[logical]
            problems.append(
                f"{field}={value} is not divisible by {shards}, the shards of `{logical}` (mesh axes {axes})"
            )

    for name, ds in config.data.datasets.items():
        micro = int(ds.get("micro_batches", 1))
        need(f"config.data.datasets.{name}.batch_size", int(ds.batch_size), "batch")
        if micro > 1 and ds.batch_size % micro == 0:
            # A micro-batch the shards don't divide would be replicated: every rank computing all of it.
            need(f"config.data.datasets.{name}.batch_size / micro_batches ({micro})", ds.batch_size // micro, "batch")
    if isinstance(mcfg, ContrastiveConfig):
        need("config.model.text.num_heads", mcfg.text.num_heads, "heads")
        need("config.model.text.dim", mcfg.text.dim, "embed")
        need("config.model.text.mlp_dim", mcfg.text.mlp_dim, "mlp")
        need("config.model.text.vocab_size", mcfg.text.vocab_size, "vocab")
    else:
        _need_flamingo(mcfg, rules, mesh_shape, need, problems)
    if mcfg.vision.kind == "clip_vit":
        need("config.model.vision.num_heads", mcfg.vision.num_heads, "heads")
        need("config.model.vision.mlp_dim", mcfg.vision.mlp_dim, "mlp")
    if problems:
        raise ValueError(f"config.mesh ({mesh_desc}) does not fit the config:\n  " + "\n  ".join(problems))


def _need_flamingo(
    mcfg: FlamingoConfig, rules: sharding.Rules, mesh_shape: Mapping[str, int], need: Any, problems: list[str]
) -> None:
    lm, xa, rs = mcfg.lm, mcfg.xattn, mcfg.resampler
    need("config.model.lm.num_heads", lm.num_heads, "heads")
    # Key/value heads that the tensor shards do not divide are replicated (sharding.REPLICATE_IF_INDIVISIBLE, as
    # LLaMA-70B's 8 on 16 shards), which splits grouped-query attention cleanly only if the shards are a multiple
    # of them: each shard's query heads then share one kv head.
    kv_shards = sharding.axis_size(rules, mesh_shape, "kv_heads")
    if lm.kv_heads % kv_shards and kv_shards % lm.kv_heads:
        problems.append(
            f"config.model.lm.num_kv_heads={lm.kv_heads} neither divides nor is divisible by {kv_shards}, the shards "
            f"of `kv_heads` (mesh axes {sharding.rule_table(rules)['kv_heads']})"
        )
    need("config.model.lm.dim", lm.dim, "embed")
    need("config.model.lm.mlp_dim", lm.mlp_dim, "mlp")
    need("config.model.lm.vocab_size", lm.vocab_size, "vocab")
    need("config.model.xattn.num_heads", xa.num_heads, "heads")
    need("config.model.xattn.ffw_mult * model.lm.dim", xa.ffw_mult * lm.dim, "mlp")
    need("config.model.resampler.num_heads", rs.num_heads, "heads")
    need("config.model.resampler.ffw_mult * vision width", rs.ffw_mult * mcfg.vision.feature_dim(), "mlp")
