"""The README's main job: the paper's two-stage recipe on the built-in synthetic data, on CPU.

    python -m flamingo_jax.recipe --config=configs/demo_two_stage.py --workdir=/tmp/flamingo_demo

Stage 1 (`configs/demo_stage1.py`) pretrains the vision encoder contrastively with a text encoder on the
synthetic pairs; its encoder is exported to WORKDIR/stage1/encoder.safetensors. Stage 2 (`configs/demo.py`)
trains the Flamingo on all four datasets with that encoder loaded and frozen, as in the paper. Pass `:DIR` to
choose where the synthetic data goes; override either stage with `--config.stage1.*` / `--config.stage2.*`.
"""

import ml_collections

from configs import demo, demo_stage1


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.order = ("stage1", "stage2")
    c.stages = ml_collections.ConfigDict()
    c.stages.stage1 = demo_stage1.get_config(arg)
    stage2 = demo.get_config(arg)
    stage2.model.vision_pretrained = "{stage1}/encoder.safetensors"
    c.stages.stage2 = stage2
    return c
