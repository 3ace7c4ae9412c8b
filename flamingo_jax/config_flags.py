"""Command-line config loading shared by the entry points: `--config=configs/x.py[:arg]` plus
`--config.a.b=value` overrides (ml_collections config_flags), validated before anything is allocated."""

from __future__ import annotations

import ml_collections
from absl import flags
from ml_collections import config_flags


def define_config_flag() -> flags.FlagHolder:
    # Idempotent, so that a script that imports the trainer (benchmarks, tools) shares its --config flag.
    if "config" in flags.FLAGS:
        return flags.FlagHolder(flags.FLAGS, flags.FLAGS["config"])
    return config_flags.DEFINE_config_file(
        "config", None, "Path to a config file in configs/ (arg after ':').", lock_config=True
    )


def get(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
    if holder.value is None:
        raise flags.ValidationError("--config is required, e.g. --config=configs/demo.py")
    return holder.value
