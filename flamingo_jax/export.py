"""Export a checkpoint for inference: safetensors weights, a JSON config and the tokenizer. No pickle anywhere.

    python -m flamingo_jax.export --workdir=DIR [--step=N] --out=OUT [--full]

    OUT/model.safetensors  the trained parameters, named by path ('resampler/layers/attn/q/kernel', ...); with
                           --full also the frozen towers, re-created as training did (from the config's seed or
                           pretrained towers) and checked against the fingerprint the checkpoint recorded
    OUT/config.json        the model config (architecture resolved), seed, preprocessing, what the file holds
    OUT/<tokenizer>        a copy of config.data.tokenizer (a SentencePiece .model or a tokenizer.json)

`flamingo_jax.load_exported(OUT)` rebuilds the model. For an export without --full it re-creates the frozen
weights from the config (so it needs the same pretrained tower files, if any) and checks their fingerprint.
Export runs in one process; it restores onto `--mesh` (one device by default) and writes tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import struct
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from flamingo_jax import checkpoint, sharding, train_step
from flamingo_jax import config as config_lib
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.models import flamingo
from flamingo_jax.pretrained import towers

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "flamingo_jax/1"


# ---------------------------------------------------------------------------------------------------------------
# The model's parameter trees, abstract (nothing allocated) and with shardings on `mesh`.
@dataclasses.dataclass(frozen=True)
class Layout:
    parts: train_step.ModelParts
    params: Any  # pure dicts of jax.ShapeDtypeStruct with shardings
    frozen: Any
    frozen_shardings: Any


def layout(mcfg: flamingo.FlamingoConfig, seed: int, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> Layout:
    abstract = nnx.eval_shape(lambda: flamingo.Flamingo(mcfg, rngs=nnx.Rngs(seed)))
    parts, params, frozen = train_step.split_model(abstract)
    var_sh = sharding.state_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    is_trainable = flamingo.trainable_filter(mcfg.trainable)
    param_sh = nnx.to_pure_dict(nnx.filter_state(var_sh, is_trainable))
    frozen_sh = nnx.to_pure_dict(nnx.filter_state(var_sh, nnx.Not(is_trainable)))
    frozen_dtype = jnp.dtype(mcfg.frozen_param_dtype)

    def with_sharding(tree: Any, shardings: Any, cast: bool) -> Any:
        def one(x: Any, s: Any) -> jax.ShapeDtypeStruct:
            dtype = frozen_dtype if cast and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=s)

        return jax.tree.map(one, tree, shardings)

    return Layout(parts, with_sharding(params, param_sh, False), with_sharding(frozen, frozen_sh, True), frozen_sh)


def init_frozen(
    mcfg: flamingo.FlamingoConfig, seed: int, mesh: jax.sharding.Mesh, rules: sharding.Rules, lay: Layout
) -> dict:
    """The frozen weights exactly as `train.init_state` makes them: initialised from `seed` in their shards, cast to
    `frozen_param_dtype`, then overwritten by the configured pretrained towers."""
    with sharding.use_mesh_rules(mesh, rules):
        frozen = _frozen_init(mcfg, seed, lay.frozen_shardings)()
    pretrained = towers.load_towers(mcfg, mesh, rules)
    frozen, _ = towers.replace_leaves(frozen, pretrained)
    return frozen


@functools.lru_cache(maxsize=4)
def _jitted_frozen_init(mcfg: flamingo.FlamingoConfig, seed: int, shardings: Any) -> Any:
    dtype = jnp.dtype(mcfg.frozen_param_dtype)

    def init() -> Any:
        _, _, frozen = train_step.split_model(flamingo.Flamingo(mcfg, rngs=nnx.Rngs(seed)))
        return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)

    return jax.jit(init, out_shardings=shardings.tree)


class _Hashable:
    """A pytree of shardings compared by value, as a cache key (the compiled init is reused: export then load)."""

    def __init__(self, tree: Any):
        self.tree = tree
        self._key = tuple(jax.tree.leaves(jax.tree.map(lambda s: (s.mesh, s.spec), tree)))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Hashable) and self._key == other._key


def _frozen_init(mcfg: flamingo.FlamingoConfig, seed: int, shardings: Any) -> Any:
    return _jitted_frozen_init(mcfg, int(seed), _Hashable(shardings))


def _mesh(shape: tuple[int, ...] = (1, 1, 1)) -> jax.sharding.Mesh:
    n = int(np.prod([s for s in shape if s > 0]))
    devices = jax.devices() if -1 in shape else jax.devices()[:n]
    return sharding.make_mesh(shape, devices=devices)


# ---------------------------------------------------------------------------------------------------------------
# safetensors, written tensor by tensor: the header first (from shapes), then each tensor fetched as it is written.
_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


def write_safetensors(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """The safetensors format (an 8-byte little-endian header size, a JSON header, raw little-endian data).

    Written here rather than with `safetensors.numpy.save_file`, which needs every tensor in host memory at
    once: this fetches one tensor at a time from its devices. The files are read back with `safetensors`.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors export needs a little-endian host")
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        dtype = np.dtype(t.dtype)
        size = int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _ST_DTYPES[dtype.name],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            f.write(np.ascontiguousarray(jax.device_get(tensors[name])).tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Export.
def _preprocess(config: ml_collections.ConfigDict, mcfg: flamingo.FlamingoConfig) -> dict[str, Any]:
    """How the training data pipeline prepared images (the first dataset's settings; evaluation mode)."""
    ds = next(iter(config.data.datasets.values()))
    return {
        "image_size": mcfg.vision.image_size,
        "resize": ds.get("resize", "pad"),
        "add_bos": bool(ds.get("add_bos", False)),
    }


def export(
    workdir: str, out: str, *, step: int | None = None, full: bool = False, mesh_shape: tuple = (1, 1, 1)
) -> str:
    """Writes OUT (see module docstring) from the checkpoint at `step` (default: the newest readable one)."""
    src = checkpoint.pick(workdir, step)
    config = ml_collections.ConfigDict(src.meta["config"])
    mcfg = config_lib.model_config(config)
    mcfg.validate()
    mesh, rules = _mesh(mesh_shape), sharding.rules_from_config(config.sharding.rules)
    lay = layout(mcfg, config.seed, mesh, rules)
    tensors = checkpoint.read_params(src.manager, src.step, checkpoint.flatten(lay.params))
    if full:
        frozen = init_frozen(mcfg, config.seed, mesh, rules, lay)
        if config.checkpoint.get("init_from"):
            # The run may have copied parameters it freezes from another run (fine-tuning): do the same.
            params = checkpoint.unflatten_like(tensors, lay.params)
            _, frozen = checkpoint.init_from(config.checkpoint.init_from, {"params": params}, frozen)
        if checkpoint.fingerprint(frozen) != src.meta["frozen_fingerprint"]:
            raise ValueError(
                "the frozen weights re-created from the config differ from those the checkpoint was trained with "
                "(different pretrained tower files, or a changed init?); nothing was written"
            )
        tensors.update(checkpoint.flatten(frozen))
    os.makedirs(out, exist_ok=True)
    contents = "full" if full else "trainable"
    write_safetensors(os.path.join(out, MODEL_FILE), tensors, {"format": FORMAT, "contents": contents})
    tok_name = _copy_tokenizer(config.data.tokenizer, out)
    model = dataclasses.asdict(mcfg)
    if full:  # everything is in the file: the tower files are not needed to load it
        model.update(lm_pretrained="", vision_pretrained="")
    doc = {
        "format": FORMAT,
        "contents": contents,
        "model": model,
        "seed": int(config.seed),
        "sharding_rules": [list(r) for r in config.sharding.rules],
        "frozen_fingerprint": src.meta["frozen_fingerprint"],
        "preprocess": _preprocess(config, mcfg),
        "tokenizer": tok_name,
        "source": {"workdir": os.path.abspath(workdir), "step": src.step},
    }
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
    return out


def _copy_tokenizer(path: str, out: str) -> str:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"config.data.tokenizer {path!r} not found: the export needs the tokenizer file")
    name = os.path.basename(path)
    shutil.copyfile(path, os.path.join(out, name))
    extra = os.path.join(os.path.dirname(path), "tokenizer_config.json")  # HF special-token names, if present
    if name.endswith(".json") and os.path.isfile(extra):
        shutil.copyfile(extra, os.path.join(out, "tokenizer_config.json"))
    return name


# ---------------------------------------------------------------------------------------------------------------
# Loading.
class Exported(NamedTuple):
    model: flamingo.Flamingo
    tokenizer: Tokenizer
    config: dict  # config.json: model, preprocess (image_size, resize, add_bos), source, ...


def load_exported(path: str, mesh: jax.sharding.Mesh | None = None) -> Exported:
    """The Flamingo (and its tokenizer) from an export directory, on `mesh` (default: one device)."""
    from safetensors import safe_open

    with open(os.path.join(path, CONFIG_FILE)) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: export format {doc.get('format')!r}, this code reads {FORMAT!r}")
    mcfg = flamingo.FlamingoConfig.from_dict(doc["model"])
    mcfg.validate()
    mesh = mesh or _mesh()
    rules = sharding.rules_from_config(doc["sharding_rules"])
    lay = layout(mcfg, doc["seed"], mesh, rules)
    with safe_open(os.path.join(path, MODEL_FILE), framework="numpy") as f:
        stored = set(f.keys())
        wanted = checkpoint.flatten(lay.params)
        if doc["contents"] == "full":
            wanted.update(checkpoint.flatten(lay.frozen))
        if stored != set(wanted):
            raise ValueError(
                f"{path}/{MODEL_FILE} does not match config.json: missing {sorted(set(wanted) - stored)[:5]}, "
                f"unexpected {sorted(stored - set(wanted))[:5]}"
            )
        values = {}
        for name, t in wanted.items():
            x = f.get_tensor(name)
            if x.shape != t.shape or x.dtype != t.dtype:
                raise ValueError(f"{name}: stored {x.dtype}{list(x.shape)}, the model needs {t.dtype}{list(t.shape)}")
            values[name] = jax.device_put(x, t.sharding)
    params = checkpoint.unflatten_like(values, lay.params)
    if doc["contents"] == "full":
        frozen = checkpoint.unflatten_like(values, lay.frozen)
    else:
        frozen = init_frozen(mcfg, doc["seed"], mesh, rules, lay)
        if checkpoint.fingerprint(frozen) != doc["frozen_fingerprint"]:
            raise ValueError(
                f"{path}: the frozen weights re-created from config.json differ from those the model was trained "
                "with (different pretrained tower files, or fine-tuned from another run?). Export with --full."
            )
    model = lay.parts.merge(params, frozen)
    return Exported(model, Tokenizer.from_path(os.path.join(path, doc["tokenizer"])), doc)


# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    from absl import flags

    from flamingo_jax.metrics import quiet_library_logs

    del argv
    quiet_library_logs()
    f = flags.FLAGS
    mesh = tuple(int(s) for s in f.mesh.split(","))
    out = export(f.workdir, f.out, step=f.step, full=f.full, mesh_shape=mesh)
    print(f"exported {os.path.abspath(out)}: " + ", ".join(sorted(os.listdir(out))))


if __name__ == "__main__":
    from absl import app, flags

    # Defined here, not at import: `flamingo_jax.train` defines --workdir too, and both may be imported together.
    flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoints/ dir, or one step dir).", required=True)
    flags.DEFINE_integer("step", None, "Step to export (default: the newest readable checkpoint).")
    flags.DEFINE_string("out", None, "Output directory.", required=True)
    flags.DEFINE_bool("full", False, "Also write the frozen towers (a self-contained model).")
    flags.DEFINE_string(
        "mesh", "1,1,1", "('data', 'fsdp', 'tensor') mesh to restore onto, e.g. 1,-1,1 for all devices."
    )
    app.run(main)
