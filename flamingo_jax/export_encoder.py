"""Hand-over from stage 1 to stage 2: the contrastively trained vision encoder as a file stage 2 loads and freezes.

    python -m flamingo_jax.export --encoder_only --workdir=STAGE1_RUN --out=encoder.safetensors [--step=N]

writes the NFNet of a `config.stage = 'contrastive'` run in the format of
`flamingo_jax.pretrained.nfnet_convert` (one tensor per parameter, named by its path in our `NFNet`; the
architecture, activation and image statistics in the file's metadata), which is what
`config.model.vision_pretrained` reads. Stage 2 then takes the tower's architecture and preprocessing from the
file (`flamingo_jax.pretrained.towers.resolve`) and keeps it frozen, as the paper does.

Only the vision tower and in its stored dtype (the text tower and the projections stay in the checkpoint). The
file is written by process 0 under a temporary name and renamed when complete; every process of a multi-process
job takes part in reading the checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from flamingo_jax import checkpoint, sharding
from flamingo_jax import config as config_lib
from flamingo_jax.models import nfnet
from flamingo_jax.models.contrastive import ContrastiveModel
from flamingo_jax.pretrained import nfnet_convert


def nfnet_architecture(vision: nfnet.NFNet, group_size: int) -> dict[str, Any]:
    """The constructor arguments of a built (or abstract) NFNet, as `nfnet_convert` records them: read off the
    module, so the stem widths NFNet completes from the config are the ones it actually built."""
    return dict(
        widths=[int(w) for w in vision.widths],
        depths=[int(d) for d in vision.depths],
        stem_widths=[int(conv.kernel.shape[-1]) for conv in vision.stem],
        group_size=int(group_size),
        se_ratio=0.5,  # the NFNet defaults `flamingo.vision_tower` builds with
        num_classes=None,
        final_conv_mult=2.0,
    )


def export_encoder(workdir: str, out: str, *, step: int | None = None) -> str:
    """Writes the vision encoder of the stage-1 checkpoint at `step` (default: the newest readable) to `out`."""
    src = checkpoint.pick(workdir, step)
    config = ml_collections.ConfigDict(src.meta["config"])
    if config.get("stage", "flamingo") != "contrastive":
        raise ValueError(
            f"{workdir}: --encoder_only exports a stage-1 (config.stage='contrastive') run's vision encoder; this "
            f"run is stage {config.get('stage', 'flamingo')!r} (export it without --encoder_only)"
        )
    mcfg = config_lib.model_config(config)
    if mcfg.vision.kind != "nfnet":
        raise ValueError(
            f"--encoder_only writes NFNet towers (the paper's); this run's vision tower is {mcfg.vision.kind!r}"
        )
    mesh = sharding.make_mesh((-1, 1, 1))  # data parallel over this job's devices: NFNet weights are replicated
    rules = sharding.rules_from_config(config.sharding.rules)
    tower = nnx.eval_shape(lambda: ContrastiveModel(mcfg, rngs=nnx.Rngs(0))).vision
    vision = nnx.state(tower, nnx.Param)
    shardings = checkpoint.flatten(nnx.to_pure_dict(sharding.state_shardings(vision, mesh, rules)))
    targets = {
        f"vision/{k}": jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
        for k, v in checkpoint.flatten(nnx.to_pure_dict(vision)).items()
    }
    arrays = checkpoint.read_params(src.manager, src.step, targets)
    # Whole on every process (tiled gathering gives a 0-d gain one dimension: its shape is restored).
    tensors = {
        k[len("vision/") :]: np.ascontiguousarray(multihost_utils.process_allgather(v, tiled=True)).reshape(v.shape)
        for k, v in arrays.items()
    }
    if jax.process_index() == 0:
        metadata = dict(
            format=nfnet_convert.FORMAT,
            architecture=json.dumps(nfnet_architecture(tower, mcfg.vision.group_size)),
            activation=mcfg.vision.activation,
            image_mean=json.dumps(list(mcfg.vision.mean)),
            image_std=json.dumps(list(mcfg.vision.std)),
            source=f"{os.path.abspath(workdir)} step {src.step} (flamingo_jax stage 1)",
        )
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = out + ".tmp"
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)  # a crash mid-write never leaves a partial file under the final name
    multihost_utils.sync_global_devices("flamingo_jax.export_encoder: done")
    return out
