"""Device mesh and logical-axis sharding.

Parameters and activations name their dimensions with logical axes (`batch`, `embed`, `mlp`, `heads`, ...);
a config's `rules` map each logical axis to zero or more mesh axes of the `('data', 'fsdp', 'tensor')` mesh.
The rules are the single place where a parallelism layout is chosen, as in MaxText. Unlike GSPMD's default, a
parameter dimension whose logical axis no rule mentions is an error (EasyLM's rule): silently replicating a
70B embedding is how jobs run out of memory at step 0.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters: `embed` is FSDP-sharded, the Megatron dims (`mlp`, `heads`, `vocab`) are
# tensor-sharded. Activations: `batch` over data and fsdp. The frozen vision encoder's images (`vision_batch`)
# spread over every axis: its weights are replicated, so without this every `tensor` rank would encode the same
# images. Everything else is replicated, by an explicit entry.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vision_batch", ("data", "fsdp", "tensor")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("added_vocab", None),
    ("layers", None),
    ("latents", None),
    ("media", None),
    ("frames", None),
    ("vision_embed", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", None),
    ("classes", None),
    ("norm", None),
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# The config fields that size each sharded logical axis, for error messages.
CONFIG_FIELDS = {
    "batch": "config.data.datasets.<name>.batch_size (and micro_batches)",
    "embed": "config.model.lm.dim",
    "mlp": "config.model.lm.mlp_dim / xattn.ffw_mult / resampler.ffw_mult / vision.mlp_dim",
    "heads": "config.model.lm.num_heads / xattn.num_heads / resampler.num_heads / vision.num_heads",
    "kv_heads": "config.model.lm.num_kv_heads",
    "vocab": "config.model.lm.vocab_size",
}


# Parameter axes that are replicated, instead of failing, when their mesh axes do not divide them. Only the
# key/value heads of grouped-query attention: LLaMA-70B has 8, a tensor axis may have 16 shards. Every tensor
# rank then holds the k/v projections whole (they are small: kv_heads/num_heads of q's) and computes them all;
# its q heads stay split, each shard attending with the kv heads of its own query heads.
REPLICATE_IF_INDIVISIBLE = frozenset({"kv_heads"})


class ShardingError(ValueError):
    """A mesh, rule or parameter that cannot be sharded as configured."""


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None, *, physical: bool = True) -> Mesh:
    """A `('data', 'fsdp', 'tensor')` mesh; one entry of `shape` may be -1 to take the remaining devices.

    `physical=False` lays the devices out in their given order instead of along the physical interconnect: for
    TPU devices that stand in for a GPU cluster, whose meshes need not follow a TPU torus.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ShardingError(f"config.mesh needs {len(MESH_AXES)} sizes for axes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ShardingError(f"config.mesh {shape}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ShardingError(f"config.mesh {shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ShardingError(
                f"config.mesh {shape}: {len(devices)} devices are not divisible by the fixed axes ({known})"
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ShardingError(
            f"config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"but {len(devices)} are available"
        )
    # Auto axes: jax >= 0.9 defaults to Explicit, under which GSPMD-style with_sharding_constraint code changes
    # meaning. The device order from mesh_utils keeps `tensor` on the fastest interconnect.
    if not physical:
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, target in rules:
        if target is None:
            table[name] = ()
        elif isinstance(target, str):
            table[name] = (target,)
        else:
            table[name] = tuple(target)
        for ax in table[name]:
            if ax not in MESH_AXES:
                raise ShardingError(f"sharding rule {name!r} -> {target!r}: unknown mesh axis {ax!r}")
    return table


def logical_to_spec(
    axes: Sequence[str | None],
    rules: Rules,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    strict: bool = True,
    what: str = "array",
) -> PartitionSpec:
    """The PartitionSpec for logical `axes` under `rules`.

    A mesh axis already used by an earlier dimension is not reused. With `shape` and `mesh`, a dimension that the
    mesh axes do not divide is an error when `strict` (parameters), unless its logical axis is one of
    REPLICATE_IF_INDIVISIBLE. Otherwise (activations, such as a batch of one while generating, or those axes) it
    keeps the largest subset of its mesh axes, in order, whose product divides it.
    """
    table = rule_table(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ShardingError(
                f"{what}: logical axis {name!r} (dim {i} of {tuple(axes)}) has no sharding rule; "
                f"add it to config.sharding.rules (map it to None to replicate)"
            )
        targets = tuple(ax for ax in table[name] if ax not in used)
        if mesh is not None:
            targets = tuple(ax for ax in targets if mesh.shape[ax] > 1)
        if shape is not None and mesh is not None and targets:
            size = math.prod(mesh.shape[ax] for ax in targets)
            if shape[i] % size:
                if strict and name not in REPLICATE_IF_INDIVISIBLE:
                    hint = CONFIG_FIELDS.get(name)
                    raise ShardingError(
                        f"{what}: dim {i} ({name}) of shape {tuple(shape)} is not divisible by mesh axes "
                        f"{targets} of total size {size}" + (f"; set {hint} or config.mesh to agree" if hint else "")
                    )
                targets = _largest_dividing_subset(targets, shape[i], mesh)
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*spec)


def _largest_dividing_subset(axes: tuple[str, ...], size: int, mesh: Mesh) -> tuple[str, ...]:
    """E.g. 768 video frames over (data 12, fsdp 8, tensor 16): (fsdp, tensor), 128 shards, not (data, fsdp)."""
    best: tuple[str, ...] = ()
    for n in range(len(axes), 0, -1):
        for subset in itertools.combinations(axes, n):
            shards = math.prod(mesh.shape[ax] for ax in subset)
            if size % shards == 0 and shards > math.prod(mesh.shape[ax] for ax in best):
                best = subset
    return best


# ---------------------------------------------------------------------------------------------------------------
# Activation constraints: models call `constrain(x, axes)`; it acts only inside `use_mesh_rules(...)`, so modules
# stay runnable on one device and in tests without any sharding context.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("flamingo_mesh", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    rule_table(rules)  # validate early
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(axes) != x.ndim:
        raise ShardingError(f"constrain: {x.ndim}-d array given {len(axes)} logical axes {tuple(axes)}")
    spec = logical_to_spec(axes, rules, shape=x.shape, mesh=mesh, strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------------------------------
# Parameter shardings.
def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for an nnx.State (abstract or concrete) from each Variable's `axes` metadata.

    Scalars and variables without `axes` are replicated only when they are not parameters (RNG counters, step
    counts); a parameter without axes is an error.
    """

    def one(path: tuple, var: Any) -> Any:
        name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        value = var.get_value() if hasattr(var, "get_value") else var.value
        shape = np.shape(value)
        axes = var.get_metadata().get("axes")
        if axes is None:
            if isinstance(var, nnx.Param):
                raise ShardingError(f"parameter {name} {tuple(shape)} has no logical axes")
            return var.replace(NamedSharding(mesh, PartitionSpec()))
        if len(axes) != len(shape):
            raise ShardingError(f"parameter {name}: axes {axes} do not match shape {tuple(shape)}")
        spec = logical_to_spec(axes, rules, shape=shape, mesh=mesh, what=f"parameter {name}")
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def axis_size(rules: Rules, mesh_shape: Mapping[str, int], name: str) -> int:
    """How many shards logical axis `name` is split into on a mesh of `mesh_shape` (1: replicated), for a dim
    that is the first of its array to use those mesh axes."""
    return math.prod(mesh_shape[ax] for ax in rule_table(rules).get(name, ()))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a host batch array: leading dim over the `batch` rule, the rest replicated."""
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, shape=shape, mesh=mesh, what="input batch")
    return NamedSharding(mesh, spec)


def rules_from_config(cfg: Mapping[str, Any] | Sequence | None) -> Rules:
    """`config.sharding.rules` as a list of (name, target) pairs; None means DEFAULT_RULES."""
    if cfg is None:
        return DEFAULT_RULES
    return tuple((str(n), None if t is None else (t if isinstance(t, str) else tuple(t))) for n, t in cfg)
