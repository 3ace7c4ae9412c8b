"""Which rows of a global batch each process loads, and the global array it builds from them.

The trainer shards a batch's leading dim over the `batch` logical axis (by default mesh axes `data` and `fsdp`)
and replicates it over the others (`tensor`). A process must load exactly the rows its own devices hold, which
on a general mesh are not "rows [p*b, (p+1)*b)": devices of one process may hold non-adjacent blocks, and
processes whose devices are `tensor` replicas of each other hold the same rows. Everything here is read off the
batch sharding's device -> index map, so it holds for any mesh, rules and process layout:

    rows = batch_rows(mesh, rules, global_batch_size)      # what this process's loader reads (sorted)
    array = global_array(local, sharding, global_shape)    # local = those rows, in that order

Functions take the devices regarded as local as an argument (default: this process's), so that a layout of
several processes can be computed, and tested, inside one process.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Collection, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, Sharding

from flamingo_jax import sharding as sharding_lib


def device_rows(sharding: Sharding, global_shape: Sequence[int]) -> dict[jax.Device, range]:
    """The rows of the leading dim that each device of `sharding` holds, for an array of `global_shape`."""
    n = int(global_shape[0])
    out = {}
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        start, stop, step = index[0].indices(n)
        if step != 1:
            raise ValueError(f"{device}: strided shard {index[0]} of the batch dimension")
        out[device] = range(start, stop)
    return out


def rows_of(
    sharding: Sharding, global_shape: Sequence[int], devices: Collection[jax.Device] | None = None
) -> list[int]:
    """The sorted rows held by any of `devices` (default: this process's devices of `sharding`)."""
    held = device_rows(sharding, global_shape)
    if devices is None:
        devices = sharding.addressable_devices
    missing = [d for d in devices if d not in held]
    if missing:
        raise ValueError(f"devices {missing} are not in the sharding's mesh")
    return sorted(set().union(*(held[d] for d in devices)))


def batch_rows(
    mesh: Mesh, rules: sharding_lib.Rules, global_batch_size: int, devices: Collection[jax.Device] | None = None
) -> list[int]:
    """The sorted rows of every global batch of `global_batch_size` that `devices` (default: this process's)
    hold under the trainer's batch sharding (`sharding.batch_sharding`): what this process's loader reads.

    Every array of a batch has the same sharding of its leading dim, so a 1-d shape stands for all of them.
    """
    shape = (int(global_batch_size),)
    return rows_of(sharding_lib.batch_sharding(mesh, rules, 1, shape), shape, devices)


def rows_for(mesh: Mesh, rules: sharding_lib.Rules) -> Callable[[int], list[int]]:
    """global batch size -> this process's `batch_rows`: the `rows_for` argument of `loader.make_mixture`."""
    return functools.partial(batch_rows, mesh, rules)


def device_shards(
    local: np.ndarray,
    sharding: Sharding,
    global_shape: Sequence[int],
    devices: Collection[jax.Device] | None = None,
) -> dict[jax.Device, np.ndarray]:
    """Each of `devices`' (default: this process's) shard of the global batch, cut from `local`: the rows
    `rows_of(sharding, global_shape, devices)` of it, in that order. The rows of one device are consecutive
    among them (its index is one slice), whether the process's rows are contiguous, scattered or replicated on
    other processes."""
    global_shape = tuple(int(s) for s in global_shape)
    local = np.asarray(local)
    if devices is None:
        devices = sharding.addressable_devices
    rows = rows_of(sharding, global_shape, devices)
    if local.shape != (len(rows), *global_shape[1:]):
        raise ValueError(
            f"these devices hold {len(rows)} rows of a global batch of shape {global_shape}, "
            f"but the host batch has shape {local.shape}"
        )
    indices = sharding.devices_indices_map(global_shape)
    out = {}
    for device in devices:
        index = indices[device]
        start, stop, _ = index[0].indices(global_shape[0])
        i = bisect.bisect_left(rows, start)
        out[device] = local[(slice(i, i + stop - start), *index[1:])]
    return out


def global_array(local: np.ndarray, sharding: Sharding, global_shape: Sequence[int]) -> jax.Array:
    """The global array of `global_shape` from this process's rows of it (`rows_of(sharding, global_shape)`,
    in that order), each addressable device given its shard (`device_shards`)."""
    shards = device_shards(local, sharding, global_shape)
    arrays = jax.device_put(list(shards.values()), list(shards))
    return jax.make_array_from_single_device_arrays(tuple(int(s) for s in global_shape), sharding, arrays)
