"""Multi-stage recipes: the paper's stage 1 (contrastive vision encoder), then stage 2 (Flamingo) on top of it.

    python -m flamingo_jax.recipe --config=configs/demo_two_stage.py --workdir=/tmp/flamingo_demo \
        [--config.stage1.train.steps=100] [--config.stage2.train.steps=200]

A recipe config holds one ordinary trainer config per stage (`stages.<name>`) and their `order`. Each stage
trains in WORKDIR/<name> with `flamingo_jax.train.train`, the same trainer as a single-stage run, so each stage
resumes from its own checkpoints: a preempted recipe started again skips finished stages and continues the
interrupted one. After a contrastive stage its vision encoder is exported to WORKDIR/<name>/encoder.safetensors
(`flamingo_jax.export_encoder`). A later stage names it with `{<name>}` in a string field, e.g.
`model.vision_pretrained = '{stage1}/encoder.safetensors'`, which becomes that stage's workdir.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging

from flamingo_jax import config_flags, distributed, export_encoder, train

_CONFIG = config_flags.define_config_flag()
# --workdir is the trainer's flag (defined when flamingo_jax.train is imported): here each stage's parent.

ENCODER_FILE = "encoder.safetensors"


def _resolve(node: Any, workdirs: dict[str, str]) -> Any:
    """A copy of a config with every `{stage}` in its strings replaced by that stage's workdir."""
    if isinstance(node, ml_collections.ConfigDict):
        out = ml_collections.ConfigDict()
        for k, v in node.items():
            out[k] = _resolve(v, workdirs)
        return out
    if isinstance(node, str) and "{" in node:
        try:
            return node.format(**workdirs)
        except KeyError as e:
            raise ValueError(f"recipe: {node!r} names stage {e}, which has not run before it") from e
    return node


def validate(recipe: ml_collections.ConfigDict) -> None:
    """Every stage's config is checked before the first one starts: a typo in stage 2 must not cost stage 1."""
    order = list(recipe.order)
    if sorted(order) != sorted(recipe.stages.keys()) or len(set(order)) != len(order):
        raise ValueError(f"recipe.order {order} must list each of recipe.stages {sorted(recipe.stages.keys())} once")
    placeholders = {name: f"/nonexistent/{name}" for name in order}
    for i, name in enumerate(order):
        cfg = recipe.stages[name]
        earlier = {n: placeholders[n] for n in order[:i]}
        try:
            resolved = _resolve(cfg, earlier)
            for k, v in resolved.model.items():
                if k.endswith("_pretrained") and "/nonexistent/" in str(v):
                    resolved.model[k] = ""  # made by an earlier stage: its file is checked when this stage starts
            train.validate(resolved)
        except ValueError as e:
            raise ValueError(f"recipe.stages.{name}: {e}") from e


def run(recipe: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
    """Runs the stages in order; returns each stage's last metrics."""
    validate(recipe)
    workdirs: dict[str, str] = {}
    results = {}
    for name in recipe.order:
        wd = os.path.join(workdir, name)
        cfg = _resolve(recipe.stages[name], workdirs)
        t0 = time.perf_counter()
        logging.info("recipe: stage %s (%s) in %s", name, cfg.get("stage", "flamingo"), wd)
        results[name] = train.train(cfg, wd)
        if train.is_stage1(cfg):
            export_encoder.export_encoder(wd, os.path.join(wd, ENCODER_FILE))
        logging.info("recipe: stage %s done in %.0f s", name, time.perf_counter() - t0)
        workdirs[name] = wd
    return results


def main(argv: list[str]) -> None:
    del argv
    workdir = flags.FLAGS.workdir
    if workdir is None:
        raise app.UsageError("--workdir is required (each stage runs in WORKDIR/<stage>)")
    recipe = config_flags.get(_CONFIG)
    distributed.initialize(distributed.options_from_flags())
    results = distributed.run_or_die(lambda: run(recipe, workdir))
    if jax.process_index() == 0:
        for name, metrics in results.items():
            evals = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("eval/") and "/" not in k[5:]}
            # A stage finished by an earlier run resumes at its last step and has nothing new to report.
            print(f"{name}: {evals}" if metrics else f"{name}: finished earlier (see its metrics.jsonl)")


if __name__ == "__main__":
    app.run(main)
