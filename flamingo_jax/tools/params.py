"""Parameter counts per component, computed abstractly (no weights allocated).

python -m flamingo_jax.tools.params --config=configs/flamingo_80b.py [--json]
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
from absl import app, flags
from flax import nnx

from flamingo_jax import config as config_lib
from flamingo_jax import config_flags
from flamingo_jax.models import flamingo

_CONFIG = config_flags.define_config_flag()
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")

COMPONENTS = ("vision", "resampler", "xattn", "lm")


def count_params(mcfg: flamingo.FlamingoConfig) -> dict[str, int]:
    """{vision, resampler, xattn, lm, total, trainable, frozen} from `nnx.eval_shape` (shapes only)."""
    model = nnx.eval_shape(lambda: flamingo.Flamingo(mcfg, rngs=nnx.Rngs(0)))
    flamingo.check_trainable_patterns(model, mcfg.trainable)

    def size(state: Any) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(state))

    counts = {name: size(nnx.state(getattr(model, name), nnx.Param)) for name in COMPONENTS}
    counts["total"] = size(nnx.state(model, nnx.Param))
    counts["trainable"] = size(nnx.state(model, flamingo.trainable_filter(mcfg.trainable)))
    counts["frozen"] = counts["total"] - counts["trainable"]
    return counts


def main(argv: list[str]) -> None:
    del argv
    counts = count_params(config_lib.validate(config_flags.get(_CONFIG)))
    if _JSON.value:
        print(json.dumps(counts))
        return
    for name, n in counts.items():
        print(f"{name:>10}: {n:>16,d}  ({n / 1e9:7.3f} B)")


if __name__ == "__main__":
    app.run(main)
