"""The layout-invariant record order: global batch t is the same records, in the same rows, with the same random
streams, whichever rows of it each host reads (contiguous blocks, scattered rows, replicas) and for any worker
count, and an iterator state moves between layouts."""

import json

import grain.python as grain
import numpy as np
import pytest
from absl import flags

from flamingo_jax.data.global_batches import GlobalBatchSampler, grain_state_after

N = 40


class Source:
    """Record i is the integer i."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> int:
        return int(i)

    def __repr__(self) -> str:  # Grain checks a restored state against repr(data_source)
        return f"Source({N})"


class Tag(grain.RandomMapTransform):
    """(record, a draw from the record's random stream): equal pairs mean equal records and augmentation."""

    def random_map(self, x: int, rng: np.random.Generator) -> np.ndarray:
        return np.array([x, rng.integers(1 << 30)])


def contiguous(p: int, count: int, global_batch: int) -> list[int]:
    """Host p of `count`'s rows when each reads a block (a mesh with only a `data` axis)."""
    b = global_batch // count
    return list(range(p * b, (p + 1) * b))


def loader(rows, global_batch: int, workers: int, *, shuffle: bool = True, epochs=None):
    if workers and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    sampler = GlobalBatchSampler(
        N,
        global_batch_size=global_batch,
        rows=rows,
        worker_count=workers,
        shuffle=shuffle,
        num_epochs=epochs,
        seed=7,
    )
    dl = grain.DataLoader(
        data_source=Source(),
        sampler=sampler,
        operations=[Tag(), grain.Batch(sampler.host_batch_size, drop_remainder=True)],
        worker_count=workers,
        shard_options=grain.NoSharding(),
    )
    return sampler, iter(dl)


def global_batches(layout: list[list[int]], global_batch: int, workers: int, steps: int) -> list[list[tuple]]:
    """Each step's global batch, row by row as (record, draw), gathered from hosts reading the rows of `layout`;
    hosts that read the same row must agree on it."""
    its = [loader(rows, global_batch, workers)[1] for rows in layout]
    out = []
    for _ in range(steps):
        batch: dict[int, tuple] = {}
        for rows, it in zip(layout, its):
            for r, value in zip(rows, next(it).tolist()):
                assert batch.setdefault(r, tuple(value)) == tuple(value), (r, batch[r], value)
        assert sorted(batch) == list(range(global_batch))
        out.append([batch[r] for r in range(global_batch)])
    return out


def hosts(count: int, global_batch: int = 8) -> list[list[int]]:
    return [contiguous(p, count, global_batch) for p in range(count)]


# Rows of 4 hosts x 2 devices on meshes where `fsdp` and `tensor` span hosts (tests/data/test_host_rows.py).
REPLICAS = [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]  # (1, 2, 4)
SCATTERED = [[0, 1, 4, 5], [0, 1, 4, 5], [2, 3, 6, 7], [2, 3, 6, 7]]  # (1, 4, 2), devices reordered


@pytest.mark.parametrize("workers", [0, 2])
def test_global_batches_do_not_depend_on_the_host_count(workers):
    # 7 steps of 8 cross the 40-record epoch boundary: the next epoch's reshuffle is shared too.
    one = global_batches(hosts(1), 8, 0, 7)
    assert global_batches(hosts(2), 8, workers, 7) == one
    if not workers:  # worker processes are slow to start; two hosts with workers cover the index arithmetic
        assert global_batches(hosts(4), 8, workers, 7) == one
    assert all(len(set(b)) == 8 for b in one)
    assert len(set().union(*one[:5])) == 40  # the first epoch reads every record once


@pytest.mark.parametrize("layout", [REPLICAS, SCATTERED, [[1, 3, 5, 7], [0, 2, 4, 6]]])
def test_global_batches_do_not_depend_on_which_rows_hosts_read(layout):
    assert global_batches(layout, 8, 0, 7) == global_batches(hosts(1), 8, 0, 7)


def test_rows_are_in_the_saved_state():
    a, b = loader(REPLICAS[0], 8, 0)[0], loader(SCATTERED[0], 8, 0)[0]
    assert a.host_batch_size == b.host_batch_size == 4 and repr(a) != repr(b)
    assert "rows=0-3," in repr(a) and "rows=0-1,4-5," in repr(b)
    with pytest.raises(ValueError, match="subset"):
        loader([7, 8], 8, 0)


def test_one_pass_hosts_are_disjoint_and_drop_only_the_partial_global_batch():
    reads = []
    for p in range(3):
        sampler, it = loader(contiguous(p, 3, 12), 12, 0, shuffle=False, epochs=1)
        assert len(sampler) == (N // 12) * 4
        reads.append([int(r[0]) for b in it for r in b])
    flat = sorted(x for r in reads for x in r)
    assert flat == list(range(36))  # 3 global batches of 12; the last 4 records do not make a full one


@pytest.mark.parametrize("workers", [0, 2])
def test_state_moves_from_two_hosts_to_one(workers):
    steps_before, steps_after = 3, 3
    reference = global_batches(hosts(1), 8, 0, steps_before + steps_after)
    sampler, it = loader(contiguous(1, 2, 8), 8, workers)
    for _ in range(steps_before):
        next(it)
    saved = it.get_state().decode()
    assert json.loads(saved)["sampler"] == repr(sampler)

    new_sampler, new_it = loader(None, 8, workers)  # one host: all rows
    new_it.set_state(new_sampler.adapt_state(saved, steps_before).encode())
    got = [[tuple(r) for r in next(new_it).tolist()] for _ in range(steps_after)]
    assert got == reference[steps_before:]
    # The same topology keeps Grain's own state, untouched.
    assert sampler.adapt_state(saved, steps_before) == saved


@pytest.mark.parametrize("workers", [0, 3])
def test_rebuilt_state_equals_grains_own(workers):
    _, it = loader(None, 2, workers)
    for n in range(5):
        state = json.loads(it.get_state())
        want = {k: state[k] for k in ("last_seen_indices", "last_worker_index", "worker_count")}
        assert grain_state_after(n, 2, workers) == want, n
        next(it)


def test_state_moves_between_meshes_on_the_same_hosts():
    """Host 2 of 4 saved on one mesh (rows 4-5), resumed on another (rows 4-7, a `tensor` replica of host 3)."""
    reference = global_batches(hosts(1), 8, 0, 6)
    _, it = loader(contiguous(2, 4, 8), 8, 0)
    for _ in range(3):
        next(it)
    saved = it.get_state().decode()
    new_sampler, new_it = loader(REPLICAS[2], 8, 0)
    new_it.set_state(new_sampler.adapt_state(saved, 3).encode())
    assert [[tuple(r) for r in next(new_it).tolist()] for _ in range(3)] == [b[4:8] for b in reference[3:]]
