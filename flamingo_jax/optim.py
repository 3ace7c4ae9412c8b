"""The optimiser: AdamW over the trainable parameters only, with a decay mask, a schedule and clipping."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("warmup_constant", "warmup_cosine")


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup then constant (the paper), or linear warmup then cosine to `end_lr` (70B/80B-XL variants)."""
    if cfg.schedule == "warmup_constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)), optax.constant_schedule(cfg.lr)],
            [cfg.warmup_steps],
        )
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, cfg.warmup_steps, max(total_steps, cfg.warmup_steps + 1), end_value=cfg.end_lr
        )
    raise ValueError(f"optimizer.schedule: {cfg.schedule!r}; choose one of {SCHEDULES}")


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
    """True where weight decay applies: parameters whose '/'-joined path matches none of `no_decay`."""
    compiled = [re.compile(p) for p in no_decay]

    def one(path: tuple, _: Any) -> bool:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not any(c.fullmatch(name) for c in compiled)

    return jax.tree_util.tree_map_with_path(one, params)


def make(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clip by global norm, then AdamW. Gradients arrive already summed over the mixture."""
    lr = schedule(cfg, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
        optax.adamw(
            lr,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: decay_mask(p, cfg.no_decay),
        ),
    )
    return tx, lr


def validate(cfg: ml_collections.ConfigDict) -> None:
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule: {cfg.schedule!r}; choose one of {SCHEDULES}")
    for name in ("lr", "eps"):
        if cfg[name] <= 0:
            raise ValueError(f"config.optimizer.{name} must be positive, got {cfg[name]}")
    for name in ("b1", "b2"):
        if not 0 <= cfg[name] < 1:
            raise ValueError(f"config.optimizer.{name} must be in [0, 1), got {cfg[name]}")
    if cfg.warmup_steps < 0 or cfg.weight_decay < 0 or cfg.clip_norm < 0:
        raise ValueError("config.optimizer.warmup_steps, weight_decay and clip_norm must be >= 0")
    for p in cfg.no_decay:
        re.compile(p)
