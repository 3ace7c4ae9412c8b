"""Export a checkpoint for inference: safetensors weights, a JSON config and the tokenizer. No pickle anywhere.

    python -m flamingo_jax.export --workdir=DIR [--step=N] --out=OUT [--full] [--mesh=D,F,T] [--max_file_gb=5]
    python -m flamingo_jax.export --encoder_only --workdir=STAGE1_RUN --out=encoder.safetensors   (see export_encoder)
    python launch/local.py --num_processes=2 --module=flamingo_jax.export -- --workdir=DIR --out=OUT --full

    OUT/model-00001-of-0000N.safetensors  the parameters, named by path ('resampler/layers/attn/q/kernel', ...);
                           with --full also the frozen towers, re-created as training did (from the config's seed or
                           pretrained towers) and checked against the fingerprint the checkpoint recorded
    OUT/model.safetensors.index.json  which file holds what (below); written last: its presence marks a complete
                           export
    OUT/config.json        the model config (architecture resolved), seed, preprocessing, what the files hold
    OUT/<tokenizer>        a copy of config.data.tokenizer (a SentencePiece .model or a tokenizer.json)

Like the trainer, the export is one program run by every process of a job (`flamingo_jax.distributed`: flags
or environment). Every process restores the checkpoint onto `--mesh` (default: the training config's mesh, else
(1, -1, 1), over all devices) and writes the slices its own devices hold, one tensor at a time, into its own
files: nothing is gathered across hosts, and no host holds more than one slice beyond its devices' memory. A slice
that several devices hold (replicated) is written once, by one of them, the choice spreading bytes evenly over
processes. Files are written under a temporary name and renamed when complete; process 0 writes config.json, the
tokenizer and, once every process has finished, the index.

The index extends Hugging Face's (`metadata`, `weight_map`: safetensors entry -> file) with `parameters`: for each
parameter its full `shape`, `dtype` and `slices`, each an `entry` in a `file` holding [start, stop) of every
dimension. A parameter held whole is stored under its plain name; a slice of a sharded one under the name plus its
bounds, 'lm/layers/mlp/up/kernel[0:2,0:32,64:128]'. The slices of a parameter tile it exactly.

`flamingo_jax.load_exported(OUT, mesh=...)` rebuilds the model on any mesh, whatever mesh wrote it: each device's
block is read from the stored slices that intersect it, and only their intersecting parts. It also reads the
single-file `model.safetensors` of earlier exports. For an export without --full it re-creates the frozen
weights from the config (so it needs the same pretrained tower files, if any) and checks their fingerprint.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from flamingo_jax import checkpoint, sharding, train_step
from flamingo_jax import config as config_lib
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.models import flamingo
from flamingo_jax.pretrained import towers

MODEL_FILE = "model.safetensors"  # the single file of earlier exports (still read)
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
FORMAT = "flamingo_jax/1"
MAX_FILE_BYTES = 5 * 10**9  # Hugging Face's default shard size
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


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
    `frozen_param_dtype`, except the configured pretrained towers, which are read into their shards instead (the
    random init skips them, so no tower exists twice)."""
    skip = towers.pretrained_towers(mcfg)
    shardings = checkpoint.flatten(lay.frozen_shardings)
    kept = {k: v for k, v in shardings.items() if k.split("/")[0] not in skip}
    with sharding.use_mesh_rules(mesh, rules):
        values = dict(_frozen_init(mcfg, seed, kept)())
    values.update({k: v for k, v in towers.load_towers(mcfg, mesh, rules).items() if k in shardings})
    return checkpoint.unflatten_like(values, lay.frozen_shardings)


@functools.lru_cache(maxsize=4)
def _jitted_frozen_init(mcfg: flamingo.FlamingoConfig, seed: int, shardings: Any) -> Any:
    dtype = jnp.dtype(mcfg.frozen_param_dtype)

    def init() -> Any:
        _, _, frozen = train_step.split_model(flamingo.Flamingo(mcfg, rngs=nnx.Rngs(seed)))
        frozen = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
        flat = checkpoint.flatten(frozen)
        return {k: flat[k] for k in shardings.tree}

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
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


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
            x = np.asarray(jax.device_get(tensors[name]))  # one tensor in host memory at a time
            if list(x.shape) != header[name]["shape"] or _ST_DTYPES[x.dtype.name] != header[name]["dtype"]:
                raise ValueError(f"{path}: {name} fetched as {x.dtype}{list(x.shape)}, declared {header[name]}")
            f.write(x.tobytes(order="C"))
            del x
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a crash leaves a .tmp file, never a complete-looking partial one


# ---------------------------------------------------------------------------------------------------------------
# Sharded files: which device writes which slice of which parameter, into which file. Computed from shapes and
# shardings alone, so every process derives the same plan (and process 0 the whole index) without communicating.
class Piece(NamedTuple):
    """One safetensors entry: the block [start, stop) of `param`, written from `device`'s copy."""

    param: str
    entry: str
    start: tuple[int, ...]
    stop: tuple[int, ...]
    device: Any  # jax.Device
    nbytes: int


class ShardFile(NamedTuple):
    name: str
    process: int
    pieces: tuple[Piece, ...]


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    start, stop = [], []
    for sl, n in zip(index, shape):
        a, b, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {index}")
        start.append(a)
        stop.append(b)
    return tuple(start), tuple(stop)


def slice_entry(param: str, start: Sequence[int], stop: Sequence[int]) -> str:
    """The safetensors name of a slice: 'a/b/kernel[0:2,16:32]'."""
    return f"{param}[{','.join(f'{a}:{b}' for a, b in zip(start, stop))}]"


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_files(arrays: Mapping[str, Any], max_file_bytes: int = MAX_FILE_BYTES) -> list[ShardFile]:
    """Every distinct block of every array (a jax.Array or a ShapeDtypeStruct with a sharding), assigned to one
    device that holds it, grouped into files of at most `max_file_bytes` (a larger block gets a file of its own).

    A block several devices hold goes to the one whose process has been given the fewest bytes so far (then the
    lowest device id): replicated parameters spread over processes instead of all landing on process 0. Each
    process's pieces fill its own files; files are numbered process by process.
    """
    load: collections.Counter[int] = collections.Counter()
    mine: dict[int, list[Piece]] = collections.defaultdict(list)
    for name in sorted(arrays):
        x = arrays[name]
        shape = tuple(int(n) for n in x.shape)
        itemsize = np.dtype(x.dtype).itemsize
        blocks: dict[tuple, list[Any]] = {}
        for device, index in x.sharding.devices_indices_map(shape).items():
            blocks.setdefault(_bounds(index, shape), []).append(device)
        for start, stop in sorted(blocks):
            holders = blocks[(start, stop)]
            owner = min(holders, key=lambda d: (load[d.process_index], d.id))
            nbytes = math.prod(b - a for a, b in zip(start, stop)) * itemsize
            load[owner.process_index] += nbytes
            entry = name if len(blocks) == 1 else slice_entry(name, start, stop)
            mine[owner.process_index].append(Piece(name, entry, start, stop, owner, nbytes))
    chunks: list[tuple[int, list[Piece]]] = []
    for process in sorted(mine):
        chunk: list[Piece] = []
        size = 0
        for piece in sorted(mine[process], key=lambda p: p.entry):
            if chunk and size + piece.nbytes > max_file_bytes:
                chunks.append((process, chunk))
                chunk, size = [], 0
            chunk.append(piece)
            size += piece.nbytes
        if chunk:
            chunks.append((process, chunk))
    return [ShardFile(shard_name(i, len(chunks)), p, tuple(c)) for i, (p, c) in enumerate(chunks)]


def index_doc(files: Sequence[ShardFile], arrays: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict:
    """The index (module docstring): Hugging Face's `metadata` and `weight_map`, plus `parameters`."""
    params = {
        name: {"shape": [int(n) for n in x.shape], "dtype": np.dtype(x.dtype).name, "slices": []}
        for name, x in sorted(arrays.items())
    }
    weight_map = {}
    for f in files:
        for p in f.pieces:
            params[p.param]["slices"].append(
                {"entry": p.entry, "file": f.name, "start": list(p.start), "stop": list(p.stop)}
            )
            weight_map[p.entry] = f.name
    for doc in params.values():
        doc["slices"].sort(key=lambda s: s["start"])
    total = sum(p.nbytes for f in files for p in f.pieces)
    return {
        "metadata": {**metadata, "total_size": total, "files": len(files)},
        "weight_map": dict(sorted(weight_map.items())),
        "parameters": params,
    }


def _local_block(x: jax.Array, device: Any) -> jax.Array:
    for shard in x.addressable_shards:
        if shard.device == device:
            return shard.data  # still on the device: write_safetensors fetches it when its turn comes
    raise AssertionError(f"device {device} holds no shard of an array on {x.sharding}")


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _clear(out: str) -> None:
    """Removes an earlier export's weights from `out`: the index first, so the directory never looks complete."""
    os.makedirs(out, exist_ok=True)
    for name in [INDEX_FILE, *sorted(os.listdir(out))]:
        stem = name.removesuffix(".tmp")  # also what a crashed export left half-written
        if stem in (INDEX_FILE, MODEL_FILE) or _SHARD_RE.fullmatch(stem):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out, name))


# ---------------------------------------------------------------------------------------------------------------
# Export.
def _preprocess(config: ml_collections.ConfigDict, mcfg: flamingo.FlamingoConfig) -> dict[str, Any]:
    """How the training data pipeline prepared images and text (the first dataset's settings; evaluation mode)."""
    ds = next(iter(config.data.datasets.values()))
    add_bos = ds.get("add_bos")
    if add_bos is None:  # as the loaders decide it: the tokenizer's own files
        add_bos = Tokenizer.from_path(config.data.tokenizer, model_vocab_size=mcfg.lm.vocab_size).adds_bos
    return {"image_size": mcfg.vision.image_size, "resize": ds.get("resize", "pad"), "add_bos": bool(add_bos)}


def _export_mesh(
    config: ml_collections.ConfigDict, mcfg: flamingo.FlamingoConfig, rules: sharding.Rules, shape: Sequence | None
) -> tuple[jax.sharding.Mesh, Layout]:
    """`shape` on the devices; by default the training config's mesh over all devices, else (1, -1, 1), else the
    parameters replicated on every device (data parallel), whichever first shards every parameter."""
    if shape is not None:
        mesh = _mesh(tuple(shape))
        return mesh, layout(mcfg, config.seed, mesh, rules)
    errors = []
    for candidate in (tuple(config.mesh), (1, -1, 1), (-1, 1, 1)):
        try:
            mesh = sharding.make_mesh(candidate)
            return mesh, layout(mcfg, config.seed, mesh, rules)
        except sharding.ShardingError as e:
            errors.append(f"{candidate}: {e}")
            logging.warning("export: mesh %s does not fit (%s); trying the next", candidate, e)
    raise sharding.ShardingError("no default mesh fits; pass --mesh. " + "; ".join(errors))


def export(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    full: bool = False,
    mesh_shape: Sequence[int] | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> str:
    """Writes OUT (see module docstring) from the checkpoint at `step` (default: the newest readable one).

    Every process of a multi-process job calls this; each writes its own files. `mesh_shape` None: the training
    config's mesh if it fits the devices (module docstring)."""
    src = checkpoint.pick(workdir, step)
    config = ml_collections.ConfigDict(src.meta["config"])
    if config.get("stage", "flamingo") == "contrastive":
        raise ValueError(f"{workdir} is a stage-1 (contrastive) run: export its vision encoder with --encoder_only")
    mcfg = config_lib.model_config(config)
    mcfg.validate()
    tokenizer = config.data.tokenizer
    if not tokenizer or not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"config.data.tokenizer {tokenizer!r} not found: the export needs the tokenizer file")
    rules = sharding.rules_from_config(config.sharding.rules)
    mesh, lay = _export_mesh(config, mcfg, rules, mesh_shape)
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
    contents = "full" if full else "trainable"
    me = jax.process_index()
    if me == 0:
        _clear(out)
    _barrier("flamingo_jax.export: cleared")
    files = plan_files(tensors, max_file_bytes)
    for f in files:
        if f.process == me:
            blocks = {p.entry: _local_block(tensors[p.param], p.device) for p in f.pieces}
            write_safetensors(os.path.join(out, f.name), blocks, {"format": FORMAT, "contents": contents})
    logging.info("export: process %d wrote %d of %d files", me, sum(f.process == me for f in files), len(files))
    _barrier("flamingo_jax.export: written")
    if me == 0:
        tok_name = _copy_tokenizer(tokenizer, out)
        model = dataclasses.asdict(mcfg)
        if full:  # everything is in the files: the tower files are not needed to load them
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
            "weights": INDEX_FILE,
            "source": {"workdir": os.path.abspath(workdir), "step": src.step},
        }
        _write_text(os.path.join(out, CONFIG_FILE), json.dumps(doc, indent=2, sort_keys=True))
        meta = {
            "format": FORMAT,
            "contents": contents,
            "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "processes": jax.process_count(),
        }
        _write_text(os.path.join(out, INDEX_FILE), json.dumps(index_doc(files, tensors, meta), indent=1))
    _barrier("flamingo_jax.export: done")  # every process returns once the export is complete
    return out


def _copy_tokenizer(path: str, out: str) -> str:
    name = os.path.basename(path)
    shutil.copyfile(path, os.path.join(out, name + ".tmp"))
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    extra = os.path.join(os.path.dirname(path), "tokenizer_config.json")  # special-token names, add_bos_token
    if os.path.isfile(extra):
        shutil.copyfile(extra, os.path.join(out, "tokenizer_config.json"))
    return name


# ---------------------------------------------------------------------------------------------------------------
# Loading: each device's block read from the stored slices that intersect it.
class Stored(NamedTuple):
    """A parameter as stored: full shape, dtype name, and its slices (file, entry, start, stop)."""

    shape: tuple[int, ...]
    dtype: str
    slices: tuple[tuple[str, str, tuple[int, ...], tuple[int, ...]], ...]


def _stored(path: str) -> tuple[dict[str, Stored], str]:
    """{parameter: Stored} and the file that describes them (the index, or the single model.safetensors)."""
    from safetensors import safe_open

    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            doc = json.load(f)
        fmt = doc.get("metadata", {}).get("format")
        if fmt != FORMAT or "parameters" not in doc:
            raise ValueError(f"{index_path}: index format {fmt!r}, this code reads {FORMAT!r}")
        out = {}
        for name, p in doc["parameters"].items():
            slices = tuple((s["file"], s["entry"], tuple(s["start"]), tuple(s["stop"])) for s in p["slices"])
            out[name] = Stored(tuple(p["shape"]), p["dtype"], slices)
        return out, index_path
    single = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {MODEL_FILE} (an incomplete export?)")
    out = {}
    try:
        with safe_open(single, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (not a dict)
                view = f.get_slice(name)
                shape = tuple(view.get_shape())
                out[name] = Stored(shape, _ST_NAMES[view.get_dtype()], ((MODEL_FILE, name, (0,) * len(shape), shape),))
    except Exception as e:
        raise ValueError(f"{single}: not a readable safetensors file: {e}") from e
    return out, single


def _check_tiling(name: str, st: Stored, where: str) -> None:
    """The slices of `name` lie inside its shape and cover it exactly once."""
    files = sorted({s[0] for s in st.slices})
    for file, entry, start, stop in st.slices:
        if len(start) != len(st.shape) or not all(0 <= a <= b <= n for a, b, n in zip(start, stop, st.shape)):
            raise ValueError(f"{where}: {file}: {entry} has bounds {start}-{stop} outside {name}'s shape {st.shape}")
    vol = lambda s: math.prod(b - a for a, b in zip(s[2], s[3]))
    for i, s in enumerate(st.slices):
        for t in st.slices[i + 1 :]:
            if vol(s) and vol(t) and all(a1 < b2 and a2 < b1 for a1, b1, a2, b2 in zip(s[2], s[3], t[2], t[3])):
                raise ValueError(f"{where}: {name}: slices {s[1]} ({s[0]}) and {t[1]} ({t[0]}) overlap")
    if sum(vol(s) for s in st.slices) != math.prod(st.shape) or (not st.slices and math.prod(st.shape)):
        raise ValueError(
            f"{where}: {name} {list(st.shape)}: its slices (in {files or 'no file'}) do not cover the whole tensor"
        )


class _Reader:
    """Open safetensors files of one export, each opened on first use; partial reads of stored slices."""

    def __init__(self, root: str):
        self.root = root
        self.stack = contextlib.ExitStack()
        self.files: dict[str, tuple[Any, set[str]]] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()

    def _open(self, file: str) -> tuple[Any, set[str]]:
        from safetensors import safe_open

        if file not in self.files:
            p = os.path.join(self.root, file)
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: missing (the export's index names it)")
            try:
                f = self.stack.enter_context(safe_open(p, framework="numpy"))
            except Exception as e:
                raise ValueError(f"{p}: not a readable safetensors file (damaged or truncated?): {e}") from e
            self.files[file] = (f, set(f.keys()))
        return self.files[file]

    def read(self, sl: tuple, dtype: str, index: tuple[slice, ...]) -> np.ndarray:
        """`index` (relative to the stored slice `sl`) of that slice."""
        file, entry, start, stop = sl
        f, keys = self._open(file)
        where = os.path.join(self.root, file)
        if entry not in keys:
            raise ValueError(f"{where}: no tensor {entry!r} (the export's index says it is there)")
        view = f.get_slice(entry)
        want = [b - a for a, b in zip(start, stop)]
        if view.get_shape() != want or view.get_dtype() != _ST_DTYPES[dtype]:
            raise ValueError(
                f"{where}: tensor {entry!r} is {view.get_dtype()}{view.get_shape()}, the index says "
                f"{_ST_DTYPES[dtype]}{want}"
            )
        try:
            if not index:
                return np.asarray(f.get_tensor(entry))
            if any(s.start == s.stop for s in index):  # safetensors refuses empty slices
                return np.zeros([s.stop - s.start for s in index], jnp.dtype(dtype))
            return view[index]
        except Exception as e:
            raise ValueError(f"{where}: tensor {entry!r}: cannot read {index}: {e}") from e


def _block_reader(reader: _Reader, name: str, st: Stored) -> Any:
    """The make_array_from_callback callback of one parameter: a block from the stored slices it intersects."""
    cache: dict[tuple, np.ndarray] = {}  # a block that several local devices hold is read once

    def block(index: tuple[slice, ...]) -> np.ndarray:
        lo, hi = _bounds(index, st.shape)
        if (lo, hi) in cache:
            return cache[(lo, hi)]
        shape = [b - a for a, b in zip(lo, hi)]
        if not math.prod(shape):
            return np.zeros(shape, jnp.dtype(st.dtype))
        out, covered = None, 0
        for sl in st.slices:
            _, _, start, stop = sl
            a = [max(x, y) for x, y in zip(lo, start)]
            b = [min(x, y) for x, y in zip(hi, stop)]
            if any(x >= y for x, y in zip(a, b)):
                continue
            part = reader.read(sl, st.dtype, tuple(slice(x - s, y - s) for x, y, s in zip(a, b, start)))
            if list(part.shape) == shape:  # one stored slice holds the whole block: no copy
                out, covered = part, math.prod(shape)
                break
            if out is None:
                out = np.empty(shape, part.dtype)
            out[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, lo))] = part
            covered += part.size
        if out is None or covered != math.prod(shape):
            raise ValueError(f"{reader.root}: {name}: the stored slices do not cover the block {lo}-{hi}")
        cache[(lo, hi)] = out
        return out

    return block


class Exported(NamedTuple):
    model: flamingo.Flamingo
    tokenizer: Tokenizer
    config: dict  # config.json: model, preprocess (image_size, resize, add_bos), source, ...


def load_exported(path: str, mesh: jax.sharding.Mesh | None = None) -> Exported:
    """The Flamingo (and its tokenizer) from an export directory, on `mesh` (default: one device).

    Any mesh, whatever mesh the export was written from: each device's block of each parameter is read from the
    stored slices that intersect it (partial reads), so no host reads more than its devices hold."""
    with open(os.path.join(path, CONFIG_FILE)) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: export format {doc.get('format')!r}, this code reads {FORMAT!r}")
    mcfg = flamingo.FlamingoConfig.from_dict(doc["model"])
    mcfg.validate()
    mesh = mesh or _mesh()
    rules = sharding.rules_from_config(doc["sharding_rules"])
    lay = layout(mcfg, doc["seed"], mesh, rules)
    wanted = checkpoint.flatten(lay.params)
    if doc["contents"] == "full":
        wanted.update(checkpoint.flatten(lay.frozen))
    stored, where = _stored(path)
    unknown = sorted(set(stored) - set(wanted))
    if unknown:
        files = sorted({s[0] for n in unknown for s in stored[n].slices})
        raise ValueError(f"{where}: tensors the model has no place for: {unknown[:5]} (in {files[:5]})")
    missing = sorted(set(wanted) - set(stored))
    if missing:
        raise ValueError(f"{where}: the model's tensors {missing[:5]} are not stored (config.json: {doc['contents']})")
    for name, t in wanted.items():
        st = stored[name]
        if st.shape != tuple(t.shape) or st.dtype != np.dtype(t.dtype).name:
            files = sorted({s[0] for s in st.slices})
            raise ValueError(
                f"{where}: {name} (in {files}): stored {st.dtype}{list(st.shape)}, the model needs "
                f"{np.dtype(t.dtype).name}{list(t.shape)}"
            )
        _check_tiling(name, st, where)
    for file in sorted({s[0] for st in stored.values() for s in st.slices}):  # every file there, before any read
        if not os.path.isfile(os.path.join(path, file)):
            raise FileNotFoundError(f"{os.path.join(path, file)}: missing (named by {where})")
    with _Reader(path) as reader:
        values = {
            name: jax.make_array_from_callback(
                tuple(t.shape), t.sharding, _block_reader(reader, name, stored[name]), dtype=t.dtype
            )
            for name, t in wanted.items()
        }
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
    # The added tokens after the LM's rows, as in training (which checked this tokenizer against the LM).
    tok = Tokenizer.from_path(os.path.join(path, doc["tokenizer"]), model_vocab_size=mcfg.lm.vocab_size)
    return Exported(model, tok, doc)


# ---------------------------------------------------------------------------------------------------------------
def parse_mesh(text: str) -> tuple[int, ...] | None:
    """'1,-1,1' -> (1, -1, 1); '' -> None."""
    return tuple(int(s) for s in text.split(",")) if text.strip() else None


def main(argv: list[str]) -> None:
    from absl import flags

    from flamingo_jax import distributed
    from flamingo_jax.metrics import quiet_library_logs

    del argv
    quiet_library_logs()
    f = flags.FLAGS
    # Joins the multi-process job (flags or environment, see flamingo_jax.distributed) before any device is touched.
    distributed.initialize(distributed.options_from_flags())
    if f.encoder_only:
        from flamingo_jax.export_encoder import export_encoder

        out = distributed.run_or_die(lambda: export_encoder(f.workdir, f.out, step=f.step))
        if jax.process_index() == 0:
            print(f"exported the stage-1 vision encoder to {os.path.abspath(out)}")
        return
    mesh = parse_mesh(f.mesh)
    max_bytes = int(f.max_file_gb * 1e9)
    out = distributed.run_or_die(
        lambda: export(f.workdir, f.out, step=f.step, full=f.full, mesh_shape=mesh, max_file_bytes=max_bytes)
    )
    if jax.process_index() == 0:
        print(f"exported {os.path.abspath(out)}: " + ", ".join(sorted(os.listdir(out))))


if __name__ == "__main__":
    from absl import app, flags

    from flamingo_jax import distributed  # noqa: F401  (defines the --distributed, --coordinator_address... flags)

    # Defined here, not at import: `flamingo_jax.train` defines --workdir too, and both may be imported together.
    flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoints/ dir, or one step dir).", required=True)
    flags.DEFINE_integer("step", None, "Step to export (default: the newest readable checkpoint).")
    flags.DEFINE_string("out", None, "Output directory (visible to every process).", required=True)
    flags.DEFINE_bool("full", False, "Also write the frozen towers (a self-contained model).")
    flags.DEFINE_bool(
        "encoder_only",
        False,
        "Stage-1 runs: write only the trained vision encoder, as the file config.model.vision_pretrained loads.",
    )
    flags.DEFINE_string(
        "mesh",
        "",
        "('data', 'fsdp', 'tensor') mesh to restore onto and write from, e.g. 1,-1,1; default: the training "
        "config's mesh over all devices, else 1,-1,1.",
    )
    flags.DEFINE_float("max_file_gb", MAX_FILE_BYTES / 1e9, "Largest safetensors file (GB); a bigger slice gets one.")
    app.run(main)
