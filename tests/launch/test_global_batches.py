"""The process-count-invariant record order: global batch t is the same records with the same random streams on
any number of hosts and workers, and an iterator state moves between topologies."""

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


def loader(p: int, count: int, host_batch: int, workers: int, *, shuffle: bool = True, epochs=None):
    if workers and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    sampler = GlobalBatchSampler(
        N,
        process_index=p,
        process_count=count,
        host_batch_size=host_batch,
        worker_count=workers,
        shuffle=shuffle,
        num_epochs=epochs,
        seed=7,
    )
    dl = grain.DataLoader(
        data_source=Source(),
        sampler=sampler,
        operations=[Tag(), grain.Batch(host_batch, drop_remainder=True)],
        worker_count=workers,
        shard_options=grain.NoSharding(),
    )
    return sampler, iter(dl)


def global_batches(count: int, global_batch: int, workers: int, steps: int) -> list[set[tuple[int, int]]]:
    """Each step's global batch as a set of (record, draw), gathered over `count` hosts."""
    its = [loader(p, count, global_batch // count, workers)[1] for p in range(count)]
    out = []
    for _ in range(steps):
        out.append({tuple(row) for it in its for row in next(it).tolist()})
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_global_batches_do_not_depend_on_the_host_count(workers):
    # 7 steps of 8 cross the 40-record epoch boundary: the next epoch's reshuffle is shared too.
    one = global_batches(1, 8, 0, 7)
    assert global_batches(2, 8, workers, 7) == one
    if not workers:  # worker processes are slow to start; two hosts with workers cover the index arithmetic
        assert global_batches(4, 8, workers, 7) == one
    assert all(len(b) == 8 for b in one)
    assert len(set().union(*one[:5])) == 40  # the first epoch reads every record once


def test_one_pass_hosts_are_disjoint_and_drop_only_the_partial_global_batch():
    reads = []
    for p in range(3):
        sampler, it = loader(p, 3, 4, 0, shuffle=False, epochs=1)
        assert len(sampler) == (N // 12) * 4
        reads.append([int(r[0]) for b in it for r in b])
    flat = sorted(x for r in reads for x in r)
    assert flat == list(range(36))  # 3 global batches of 12; the last 4 records do not make a full one


@pytest.mark.parametrize("workers", [0, 2])
def test_state_moves_from_two_hosts_to_one(workers):
    steps_before, steps_after = 3, 3
    reference = global_batches(1, 8, 0, steps_before + steps_after)
    sampler, it = loader(1, 2, 4, workers)
    for _ in range(steps_before):
        next(it)
    saved = it.get_state().decode()
    assert json.loads(saved)["sampler"] == repr(sampler)

    new_sampler, new_it = loader(0, 1, 8, workers)
    new_it.set_state(new_sampler.adapt_state(saved, steps_before).encode())
    got = [{tuple(r) for r in next(new_it).tolist()} for _ in range(steps_after)]
    assert got == reference[steps_before:]
    # The same topology keeps Grain's own state, untouched.
    assert sampler.adapt_state(saved, steps_before) == saved


@pytest.mark.parametrize("workers", [0, 3])
def test_rebuilt_state_equals_grains_own(workers):
    _, it = loader(0, 1, 2, workers)
    for n in range(5):
        state = json.loads(it.get_state())
        want = {k: state[k] for k in ("last_seen_indices", "last_worker_index", "worker_count")}
        assert grain_state_after(n, 2, workers) == want, n
        next(it)
