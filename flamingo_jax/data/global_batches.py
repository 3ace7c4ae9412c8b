"""A record order that does not depend on how many hosts read it.

Grain's `ShardOptions` gives each host a contiguous block of the records and shuffles within it, so the
examples in global batch t depend on the process count: a run on 2 hosts x 4 devices does not see the batches a
run on 1 host x 8 devices sees, and a checkpoint's iterator state cannot move between the two.

`GlobalBatchSampler` instead fixes one global sequence (shuffled by seed, repeated by epoch) and cuts it into
global batches of B = host_batch_size * process_count records; host p reads rows [p*b, (p+1)*b) of every global
batch. Each record's random stream (crop, flip, window, link_next) is seeded by its *global* position. So global
batch t holds the same records, preprocessed the same way, for any number of hosts, and the position in the
stream after t steps is the same everywhere: `grain_state_after` rebuilds a host's Grain state from the step
count alone, which is what lets a checkpoint written by N hosts resume on M.
"""

from __future__ import annotations

import json
from typing import Any

import grain.python as grain


class GlobalBatchSampler:
    """A Grain sampler over host `process_index`'s rows of each global batch.

    Grain's DataLoader hands local index j to worker j % W, and each worker batches its records in order, so the
    loader's output batch t comes from worker t % W. The index arithmetic in `global_position` undoes that, so
    output batch t is global batch t whatever the worker count.
    """

    def __init__(
        self,
        num_records: int,
        *,
        process_index: int,
        process_count: int,
        host_batch_size: int,
        worker_count: int,
        shuffle: bool,
        num_epochs: int | None,
        seed: int,
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if host_batch_size <= 0:
            raise ValueError(f"host_batch_size must be positive, got {host_batch_size}")
        self._global = grain.IndexSampler(
            num_records=num_records,
            shard_options=grain.NoSharding(),
            shuffle=shuffle,
            num_epochs=num_epochs,
            seed=seed,
        )
        self.process_index, self.process_count = process_index, process_count
        self.host_batch_size, self.worker_count = host_batch_size, worker_count
        self.global_batch_size = host_batch_size * process_count
        self._workers = max(worker_count, 1)
        full_batches = len(self._global) // self.global_batch_size  # the last partial global batch is dropped
        # With W workers, worker w makes batches w, w + W, ...: whole rounds only, so every worker's index range
        # maps inside the global order (a finite split with workers drops up to W - 1 more batches).
        self._len = (full_batches // self._workers) * self._workers * host_batch_size
        self._desc = (
            f"GlobalBatchSampler(num_records={num_records}, process_index={process_index}, "
            f"process_count={process_count}, host_batch_size={host_batch_size}, worker_count={worker_count}, "
            f"shuffle={shuffle}, num_epochs={num_epochs}, seed={seed})"
        )

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        # Grain stores this in its iterator state; `adapt_state` compares it to detect a changed topology.
        return self._desc

    def global_position(self, local_index: int) -> int:
        b, w = self.host_batch_size, self._workers
        worker, m = local_index % w, local_index // w
        step = (m // b) * w + worker  # the loader's output batch number, i.e. the global batch
        return step * self.global_batch_size + self.process_index * b + m % b

    def __getitem__(self, local_index: int) -> Any:
        if not 0 <= local_index < self._len:
            raise IndexError(f"index {local_index} out of range [0, {self._len})")
        # The metadata's index and rng are those of the global position: the same record gets the same
        # augmentation on any number of hosts.
        return self._global[self.global_position(local_index)]

    def adapt_state(self, grain_state: str, batches: int) -> str:
        """Grain DataLoader state (JSON) for this sampler after `batches` batches.

        A state saved with this very topology is returned unchanged; one saved by another process count, host,
        batch size or worker count is rebuilt from the number of batches consumed (the global step).
        """
        state = json.loads(grain_state)
        if state.get("sampler") == repr(self):
            return grain_state
        state.update(grain_state_after(batches, self.host_batch_size, self.worker_count))
        state["sampler"] = repr(self)
        return json.dumps(state, indent=4)


def grain_state_after(batches: int, batch_size: int, worker_count: int) -> dict[str, Any]:
    """The position fields of a Grain DataLoader state (version 2) after `batches` output batches of
    `batch_size` records, for an unsharded sampler and `worker_count` workers (0: in-process)."""
    if batches < 0:
        raise ValueError(f"batches must be >= 0, got {batches}")
    if worker_count == 0:
        # Grain reports the last index seen; -1 before the first record.
        return {"last_seen_indices": {"0": batches * batch_size - 1}, "last_worker_index": -1, "worker_count": 0}
    w = worker_count
    last_seen = {}
    for i in range(w):
        made = (batches - i + w - 1) // w if batches > i else 0  # output batches i, i + w, ... below `batches`
        last_seen[str(i)] = i - w + made * batch_size * w
    return {
        "last_seen_indices": last_seen,
        "last_worker_index": batches % w - 1,  # Grain's convention: the next worker's index, minus one
        "worker_count": w,
    }
