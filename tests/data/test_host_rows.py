"""Which rows of a global batch each process loads (flamingo_jax.data.host_rows), for several meshes and process
layouts simulated in one process: the 8 CPU devices of tests/conftest.py split into "processes" of consecutive
devices, as `jax.devices()` orders the devices of a real multi-process job."""

import jax
import numpy as np
import pytest

from flamingo_jax import sharding
from flamingo_jax.data import host_rows

B = 8


def processes(count: int) -> list[list[jax.Device]]:
    devices = jax.devices()
    n = len(devices) // count
    return [devices[p * n : (p + 1) * n] for p in range(count)]


def batch_sharding(mesh, shape):
    return sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, len(shape), shape)


# Rows of each of 4 processes x 2 devices: `batch` is ('data', 'fsdp'); `tensor` holds replicas, so on (1, 2, 4)
# processes 0 and 1 (one tensor group) read the same rows, and on (1, 1, 8) every process reads all of them.
FOUR_BY_TWO = {
    (8, 1, 1): [[0, 1], [2, 3], [4, 5], [6, 7]],
    (2, 2, 2): [[0, 1], [2, 3], [4, 5], [6, 7]],
    (1, 2, 4): [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]],
    (1, 1, 8): [list(range(8))] * 4,
}


@pytest.mark.parametrize("shape", list(FOUR_BY_TWO))
@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_rows_per_process(shape, count):
    mesh = sharding.make_mesh(shape)
    procs = processes(count)
    rows = [host_rows.batch_rows(mesh, sharding.DEFAULT_RULES, B, devices=d) for d in procs]
    if count == 4:
        assert rows == FOUR_BY_TWO[shape]
    if count == 1:
        assert rows == [list(range(B))]
        assert host_rows.batch_rows(mesh, sharding.DEFAULT_RULES, B) == list(range(B))  # this process's
    assert sorted(set().union(*rows)) == list(range(B))  # every row is read by some process
    # Devices that are `tensor` replicas hold the same rows, so processes that share a replica group read the same.
    per_device = host_rows.device_rows(batch_sharding(mesh, (B,)), (B,))
    for group in mesh.devices.reshape(-1, shape[2]):
        assert len({tuple(per_device[d]) for d in group}) == 1
    for p, devs in enumerate(procs):
        assert rows[p] == sorted(set().union(*(per_device[d] for d in devs)))


def test_scattered_and_replicated_rows():
    # A device order that gives process 0 (devices 0, 1) the batch blocks 0 and 2 of 4: rows {0, 1, 4, 5}.
    devices = jax.devices()
    order = [devices[i] for i in (0, 2, 4, 6, 1, 3, 5, 7)]
    mesh = sharding.make_mesh((1, 4, 2), devices=order)
    rows = [host_rows.batch_rows(mesh, sharding.DEFAULT_RULES, B, devices=d) for d in processes(4)]
    assert rows == [[0, 1, 4, 5], [0, 1, 4, 5], [2, 3, 6, 7], [2, 3, 6, 7]]
    # Rules that replicate the batch: every process reads every row.
    rules = [(n, None if n == "batch" else t) for n, t in sharding.DEFAULT_RULES]
    assert host_rows.batch_rows(sharding.make_mesh((8, 1, 1)), rules, B, devices=processes(4)[1]) == list(range(B))


@pytest.mark.parametrize(
    ("shape", "order"),
    [((1, 2, 4), range(8)), ((1, 4, 2), (0, 2, 4, 6, 1, 3, 5, 7)), ((2, 2, 2), (7, 6, 5, 4, 3, 2, 1, 0))],
)
def test_each_process_cuts_its_devices_shards_from_its_rows(shape, order):
    mesh = sharding.make_mesh(shape, devices=[jax.devices()[i] for i in order])
    full = np.arange(B * 3).reshape(B, 3)
    sh = batch_sharding(mesh, full.shape)
    indices = sh.devices_indices_map(full.shape)
    for devs in processes(4):
        local = full[host_rows.rows_of(sh, full.shape, devs)]  # what this process's loader gives
        shards = host_rows.device_shards(local, sh, full.shape, devs)
        assert list(shards) == devs
        for d, shard in shards.items():
            np.testing.assert_array_equal(shard, full[indices[d]])
    with pytest.raises(ValueError, match="host batch has shape"):
        host_rows.device_shards(full[:3], sh, full.shape, processes(4)[0])


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 2, 4), (1, 1, 8)])
def test_global_array_in_one_process(shape):
    devices = jax.devices()
    mesh = sharding.make_mesh(shape, devices=devices[::-1])
    full = np.arange(B * 2 * 3, dtype=np.int32).reshape(B, 2, 3)
    sh = batch_sharding(mesh, full.shape)
    arr = host_rows.global_array(full, sh, full.shape)
    assert arr.sharding == sh
    np.testing.assert_array_equal(np.asarray(arr), full)
    want = jax.make_array_from_process_local_data(sh, full, full.shape)  # equal where that one applies
    for a, b in zip(arr.addressable_shards, want.addressable_shards):
        assert a.device == b.device and a.index == b.index
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
