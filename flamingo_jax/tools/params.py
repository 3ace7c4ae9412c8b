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
from flamingo_jax.models import contrastive, flamingo

_CONFIG = config_flags.define_config_flag()
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")

COMPONENTS = ("vision", "resampler", "xattn", "lm")
STAGE1_COMPONENTS = ("vision", "text", "vision_proj", "text_proj")


def count_params(mcfg: flamingo.FlamingoConfig | contrastive.ContrastiveConfig) -> dict[str, int]:
    """{vision, resampler, xattn, lm, total, trainable, frozen} from `nnx.eval_shape` (shapes only); for a
    stage-1 model, {vision, text, vision_proj, text_proj, total, trainable, frozen}."""
    stage1 = isinstance(mcfg, contrastive.ContrastiveConfig)
    make = contrastive.ContrastiveModel if stage1 else flamingo.Flamingo
    model = nnx.eval_shape(lambda: make(mcfg, rngs=nnx.Rngs(0)))
    flamingo.check_trainable_patterns(model, mcfg.trainable)

    def size(state: Any) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(state))

    counts = {
        name: size(nnx.state(getattr(model, name), nnx.Param)) for name in (STAGE1_COMPONENTS if stage1 else COMPONENTS)
    }
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
