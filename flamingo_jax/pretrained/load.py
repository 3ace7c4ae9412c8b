"""Load checkpoint tensors straight into their shards.

Every parameter of a target `nnx.State` is described by a `Source`: which checkpoint tensor(s) hold it and how
they are laid out relative to ours (transposes, head splits, fused projections, stacked layers). The array
is then built with `jax.make_array_from_callback`, whose callback reads only the slice that one device holds
(positional reads of the safetensors file, in bounded chunks) and casts it to the parameter's final dtype. No
host ever materialises a full copy of a tensor it shards, so a 70B LM loads onto a pod in its final layout.

Everything that can be checked before reading a value is checked first: every parameter has a source, every
source tensor exists with the expected shape, and no checkpoint tensor is left unused (an unused tensor almost
always means a mapping bug or the wrong architecture). The errors name the tensor and the expected shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, Sharding, SingleDeviceSharding

from flamingo_jax import sharding as sharding_lib

Shape = tuple[int, ...]
Index = tuple[slice, ...]

# Rows averaged per read when a parameter is a mean over a (vocab-sized) tensor: bounds host memory.
_MEAN_CHUNK_ROWS = 8192


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: missing, unexpected or mis-shaped tensors."""


# ----------------------------------------------------------------------------------------------------------
# Reading safetensors files.
# Bytes read per positional read: bounds the temporary host memory of a block that is not one contiguous range.
_CHUNK_BYTES = 64 << 20

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: str
    dtype: np.dtype
    shape: Shape
    offset: int  # absolute byte offset of the first element in its file


def _pread(fd: int, n: int, offset: int, path: Path) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            raise CheckpointError(f"{path} ends early: wanted {n} bytes at offset {offset}")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks) if len(chunks) > 1 else chunks[0]


def _pread_into(fd: int, out: np.ndarray, offset: int, path: Path) -> None:
    view, got = memoryview(out.reshape(-1).view(np.uint8)), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(f"{path} ends early: wanted {len(view)} bytes at offset {offset}")
        got += n


class TensorReader:
    """Named tensors of one safetensors file, or of a directory of them (with or without an index).

    The header is parsed here and each block is read with positional reads (`os.pread`) into memory this
    process owns, one bounded chunk at a time. No file is memory-mapped: mapped pages a reader touches stay in
    the process's resident set until the mapping goes, so loading a tower through mmap costs a second copy of
    the file in RSS on top of the model it fills (measured in docs/benchmarks.md).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = self._files(self.path)
        self._fds: dict[str, int] = {}
        self._paths: dict[str, Path] = {}
        self._entries: dict[str, _Entry] = {}
        self._metadata: dict[str, str] = {}
        try:
            for f in files:
                self._fds[f.name] = os.open(f, os.O_RDONLY)
                self._paths[f.name] = f
                self._parse_header(f)
        except BaseException:
            self.close()
            raise
        self._check_index()

    def _parse_header(self, f: Path) -> None:
        fd, size = self._fds[f.name], os.fstat(self._fds[f.name]).st_size
        try:
            (n,) = struct.unpack("<Q", _pread(fd, 8, 0, f))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(_pread(fd, n, 8, f))
        except (struct.error, ValueError, CheckpointError) as e:
            raise CheckpointError(f"{f} is not a safetensors file: {e}") from e
        self._metadata.update(header.pop("__metadata__", None) or {})
        for name, info in header.items():
            if name in self._entries:
                raise CheckpointError(f"tensor {name!r} appears in both {self._entries[name].file} and {f.name}")
            if info.get("dtype") not in _DTYPES:
                raise CheckpointError(
                    f"{f}: tensor {name!r} has dtype {info.get('dtype')!r}, not one of {list(_DTYPES)}"
                )
            dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                raise CheckpointError(f"{f}: tensor {name!r} {shape} has data offsets {[begin, end]} that do not fit")
            self._entries[name] = _Entry(f.name, dtype, shape, 8 + n + begin)

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
            return [path / f for f in files]
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {path}")
        return files

    def _check_index(self) -> None:
        index = self.path / "model.safetensors.index.json" if self.path.is_dir() else None
        if index is None or not index.exists():
            return
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, fname in weight_map.items():
            found = self._entries[name].file if name in self._entries else None
            if found != fname:
                raise CheckpointError(f"{index}: tensor {name!r} is listed in {fname} but found in {found}")

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    @property
    def names(self) -> set[str]:
        return set(self._entries)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> Shape:
        return self._entries[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name].dtype

    def read(self, name: str, idx: Index) -> np.ndarray:
        """The block `idx` (slices with step 1, possibly fewer than the dims) of tensor `name`, in its dtype."""
        e = self._entries[name]
        idx = tuple(slice(*s.indices(n)[:2]) for s, n in zip(tuple(idx) + (slice(None),) * len(e.shape), e.shape))
        out = np.empty([s.stop - s.start for s in idx], e.dtype)
        if out.size:
            self._read_into(self._fds[e.file], self._paths[e.file], e.offset, e.shape, e.dtype, idx, out)
        return out

    def _read_into(
        self, fd: int, path: Path, offset: int, shape: Shape, dtype: np.dtype, idx: Index, out: np.ndarray
    ) -> None:
        if not shape:
            out[...] = np.frombuffer(_pread(fd, dtype.itemsize, offset, path), dtype)[0]
            return
        row = math.prod(shape[1:]) * dtype.itemsize  # bytes of one index along the leading dim
        first = idx[0]
        whole_rows = all(s.start == 0 and s.stop == n for s, n in zip(idx[1:], shape[1:]))
        if whole_rows:  # one contiguous byte range: read straight into the output
            _pread_into(fd, out, offset + first.start * row, path)
        elif row <= _CHUNK_BYTES:  # whole rows a chunk at a time, keeping the requested columns
            per = max(1, _CHUNK_BYTES // max(row, 1))
            for a in range(first.start, first.stop, per):
                b = min(a + per, first.stop)
                block = np.frombuffer(_pread(fd, (b - a) * row, offset + a * row, path), dtype)
                out[a - first.start : b - first.start] = block.reshape(b - a, *shape[1:])[(slice(None), *idx[1:])]
        else:  # a row larger than a chunk: descend into it
            for a in range(first.start, first.stop):
                self._read_into(fd, path, offset + a * row, shape[1:], dtype, idx[1:], out[a - first.start])


# ----------------------------------------------------------------------------------------------------------
# Sources: how one target parameter is assembled from checkpoint tensors.
class Source(Protocol):
    def tensors(self) -> list[str]:
        """Checkpoint tensors this source reads."""
        ...

    def check(self, reader: TensorReader, target_shape: Shape, what: str) -> None:
        """Raises CheckpointError, naming the tensor and its expected shape, if it cannot be filled."""
        ...

    def read(self, reader: TensorReader, idx: Index, target_shape: Shape, dtype: np.dtype) -> np.ndarray:
        """The block `idx` (normalised slices) of the target, in the target layout, cast to `dtype` (the source
        dtype is only ever held for a bounded part of it)."""
        ...


def _check_tensor(reader: TensorReader, name: str, expected: Shape, what: str) -> None:
    if name not in reader:
        raise CheckpointError(f"tensor {name!r} (expected shape {expected}, for {what}) is missing from {reader.path}")
    found = reader.shape(name)
    if found != tuple(expected):
        raise CheckpointError(f"tensor {name!r} has shape {found}, expected shape {tuple(expected)} (for {what})")


def _flat_indices(idx: Index, dims: Sequence[int], shape: Shape) -> np.ndarray:
    """Row-major flat positions, in the merged dim made of target `dims`, of the block `idx`."""
    grids = np.meshgrid(*[np.arange(idx[d].start, idx[d].stop) for d in dims], indexing="ij")
    return np.ravel_multi_index(tuple(grids), [shape[d] for d in dims])


@dataclasses.dataclass(frozen=True)
class View:
    """A target parameter that is a re-indexed view of one checkpoint tensor.

    Source dim j holds the target dims `groups[j]` merged in row-major order (so a transpose is a permutation
    of singleton groups and a head split is a group of two), starting at `offsets[j]` along that source dim (a
    slice of a fused tensor, such as GPT-2's q/k/v in `c_attn`). `groups=None` is the identity. `source_shape`
    is the full checkpoint shape when it is larger than the view (fused tensors).
    """

    name: str
    groups: tuple[tuple[int, ...], ...] | None = None
    offsets: tuple[int, ...] | None = None
    source_shape: Shape | None = None

    def tensors(self) -> list[str]:
        return [self.name]

    def _groups(self, ndim: int) -> tuple[tuple[int, ...], ...]:
        return self.groups if self.groups is not None else tuple((d,) for d in range(ndim))

    def expected_shape(self, target_shape: Shape) -> Shape:
        if self.source_shape is not None:
            return tuple(self.source_shape)
        return tuple(math.prod(target_shape[d] for d in g) for g in self._groups(len(target_shape)))

    def check(self, reader: TensorReader, target_shape: Shape, what: str) -> None:
        groups = self._groups(len(target_shape))
        covered = sorted(d for g in groups for d in g)
        if covered != list(range(len(target_shape))):
            raise CheckpointError(f"{what}: view of {self.name!r} maps dims {groups}, target has shape {target_shape}")
        _check_tensor(reader, self.name, self.expected_shape(target_shape), what)

    def read(self, reader: TensorReader, idx: Index, target_shape: Shape, dtype: np.dtype) -> np.ndarray:
        groups = self._groups(len(target_shape))
        if self.groups is None:
            return reader.read(self.name, idx).astype(dtype, copy=False)
        offsets = self.offsets or (0,) * len(groups)
        flats, src_idx = [], []
        for g, off in zip(groups, offsets):
            flat = _flat_indices(idx, g, target_shape) + off
            flats.append(flat)
            src_idx.append(slice(int(flat.min()), int(flat.max()) + 1))
        # Read the smallest contiguous superset of the block, then pick the exact rows/columns: for a head
        # split dim sharded by heads (the usual case) the superset *is* the block, so nothing extra is read.
        block = reader.read(self.name, tuple(src_idx))
        for j, (flat, s) in enumerate(zip(flats, src_idx)):
            pos = flat.ravel() - s.start
            if pos.size != block.shape[j] or np.any(pos != np.arange(pos.size)):
                block = np.take(block, pos, axis=j)
        order = [d for g in groups for d in g]
        block = block.reshape([idx[d].stop - idx[d].start for d in order])
        return np.transpose(block, np.argsort(order)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Stack:
    """A target with a leading `layers` dim whose entry i comes from `parts[i]` (one tensor per layer)."""

    parts: tuple[Any, ...]

    def tensors(self) -> list[str]:
        return [n for p in self.parts for n in p.tensors()]

    def check(self, reader: TensorReader, target_shape: Shape, what: str) -> None:
        if not target_shape or target_shape[0] != len(self.parts):
            raise CheckpointError(
                f"{what}: {len(self.parts)} stacked layers in the checkpoint, target shape {target_shape}"
            )
        for i, p in enumerate(self.parts):
            p.check(reader, target_shape[1:], f"{what}[{i}]")

    def read(self, reader: TensorReader, idx: Index, target_shape: Shape, dtype: np.dtype) -> np.ndarray:
        # Layer by layer into the final array: only one layer's block is ever held in the source dtype.
        out = np.empty([s.stop - s.start for s in idx], dtype)
        for j, i in enumerate(range(idx[0].start, idx[0].stop)):
            out[j] = self.parts[i].read(reader, idx[1:], target_shape[1:], dtype)
        return out


@dataclasses.dataclass(frozen=True)
class RowMean:
    """Rows initialised to the mean of all rows of a 2-D tensor (new token embeddings from pretrained ones).

    The target is [n, D] (or [D, n] with `transposed`, for an output head stored [embed, vocab]); the
    checkpoint tensor is [V, D]. Averaging new rows over the pretrained ones keeps their logits in the range
    of the existing vocabulary, as HF's `resize_token_embeddings` does.
    """

    name: str
    transposed: bool = False

    def tensors(self) -> list[str]:
        return [self.name]

    def check(self, reader: TensorReader, target_shape: Shape, what: str) -> None:
        dim = target_shape[0] if self.transposed else target_shape[-1]
        if self.name not in reader:
            raise CheckpointError(
                f"tensor {self.name!r} (expected shape (vocab, {dim}), for {what}) is missing from {reader.path}"
            )
        found = reader.shape(self.name)
        if len(found) != 2 or found[1] != dim:
            raise CheckpointError(f"tensor {self.name!r} has shape {found}, expected shape (vocab, {dim}) (for {what})")

    def read(self, reader: TensorReader, idx: Index, target_shape: Shape, dtype: np.dtype) -> np.ndarray:
        col = idx[0] if self.transposed else idx[1]
        vocab = reader.shape(self.name)[0]
        total = np.zeros(col.stop - col.start, np.float64)
        for start in range(0, vocab, _MEAN_CHUNK_ROWS):
            rows = reader.read(self.name, (slice(start, min(start + _MEAN_CHUNK_ROWS, vocab)), col))
            total += rows.astype(np.float64).sum(axis=0)
        mean = (total / vocab).astype(np.float32).astype(dtype)
        n = (idx[1] if self.transposed else idx[0]).stop - (idx[1] if self.transposed else idx[0]).start
        return np.repeat(mean[:, None], n, axis=1) if self.transposed else np.repeat(mean[None, :], n, axis=0)


# ----------------------------------------------------------------------------------------------------------
# View helpers for the common layouts.
def torch_linear(name: str, n_in: int, ndim: int) -> View:
    """A torch `nn.Linear.weight` [out, in] (flattened) as our kernel `in_dims + out_dims` (n_in in-dims)."""
    return View(name, groups=(tuple(range(n_in, ndim)), tuple(range(n_in))))


def merged(name: str, ndim: int, offset: int = 0, source_shape: Shape | None = None) -> View:
    """A 1-D (or fused 1-D) checkpoint tensor as our multi-dim parameter (a q bias as [heads, head_dim])."""
    return View(name, groups=(tuple(range(ndim)),), offsets=(offset,), source_shape=source_shape)


def stack(make: Callable[[int], Any], num: int) -> Stack:
    return Stack(tuple(make(i) for i in range(num)))


# ----------------------------------------------------------------------------------------------------------
# Loading a state.
def path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def _flat(state: Any) -> dict[str, Any]:
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def _value(var: Any) -> Any:
    return var.get_value() if hasattr(var, "get_value") else var.value


def _normalise(index: Any, shape: Shape) -> Index:
    if index is None:
        index = ()
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def check_sources(
    reader: TensorReader, targets: Mapping[str, Shape], sources: Mapping[str, Any], ignore: Iterable[str] = ()
) -> None:
    """Every target has a source, every source fits, and every checkpoint tensor is used (or ignored)."""
    no_source = sorted(set(targets) - set(sources))
    if no_source:
        raise CheckpointError(f"parameters with no checkpoint source: {no_source}")
    no_target = sorted(set(sources) - set(targets))
    if no_target:
        raise CheckpointError(f"checkpoint mapping names parameters the model does not have: {no_target}")
    used: set[str] = set()
    for path, src in sources.items():
        src.check(reader, tuple(targets[path]), f"parameter {path} of shape {tuple(targets[path])}")
        used.update(src.tensors())
    patterns = [re.compile(p) for p in ignore]
    extra = sorted(n for n in reader.names - used if not any(p.fullmatch(n) for p in patterns))
    if extra:
        listed = ", ".join(f"{n!r} {reader.shape(n)}" for n in extra[:8])
        more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
        raise CheckpointError(
            f"unexpected tensors in {reader.path} that the model has no parameter for: {listed}{more}"
        )


def load_state(
    reader: TensorReader,
    abstract_state: nnx.State,
    sources: Mapping[str, Any],
    *,
    shardings: nnx.State | None = None,
    ignore: Iterable[str] = (),
) -> nnx.State:
    """A concrete copy of `abstract_state` whose arrays are read from `reader` shard by shard.

    `sources` maps '/'-joined parameter paths (relative to the state) to Sources. `shardings` is a matching
    state of `jax.sharding.Sharding`s (`sharding.state_shardings`); without it, arrays go to the first local
    device. Values are cast to each abstract variable's dtype.
    """
    variables = _flat(abstract_state)
    targets = {p: tuple(np.shape(_value(v))) for p, v in variables.items()}
    check_sources(reader, targets, sources, ignore)
    target_shardings = _flat(shardings) if shardings is not None else {}
    default = SingleDeviceSharding(jax.local_devices()[0])

    def build(path: str, var: Any) -> jax.Array:
        shape, dtype = targets[path], np.dtype(_value(var).dtype)
        shard = target_shardings.get(path)
        shard = _value(shard) if shard is not None else default
        if not isinstance(shard, Sharding):
            raise CheckpointError(f"parameter {path}: sharding {shard!r} is not a jax Sharding")
        cache: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

        def cb(index: Any) -> np.ndarray:
            idx = _normalise(index, shape)
            key = tuple((s.start, s.stop) for s in idx)  # slices are unhashable before Python 3.12
            if key not in cache:  # replicated shards on several local devices read once
                cache[key] = np.asarray(sources[path].read(reader, idx, shape, dtype), order="C")  # keeps 0-d
            return cache[key]

        array = jax.make_array_from_callback(shape, shard, cb)
        # Free the host blocks now: `cb` and `cache` form a cycle that only the cyclic GC would collect, and until
        # then every tensor's host copy (the device copy is separate for bfloat16) would pile up.
        cache.clear()
        return array

    loaded = [(p, v.replace(build(path_str(p), v))) for p, v in nnx.to_flat_state(abstract_state)]
    return nnx.from_flat_state(loaded)


def load_module(
    make: Callable[[], nnx.Module],
    path: str | Path,
    sources_fn: Callable[[nnx.State, TensorReader], tuple[Mapping[str, Any], Collection[str]]],
    *,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
) -> nnx.Module:
    """Builds `make()` abstractly and fills it from the checkpoint at `path`, sharded by `rules` on `mesh`."""
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = sharding_lib.state_shardings(abstract_state, mesh, rules) if mesh is not None else None
    with TensorReader(path) as reader:
        sources, ignore = sources_fn(abstract_state, reader)
        state = load_state(reader, abstract_state, sources, shardings=shardings, ignore=ignore)
    return nnx.merge(graphdef, state)
