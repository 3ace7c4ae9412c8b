"""A record order that does not depend on how many hosts read it.

Grain's `ShardOptions` gives each host a contiguous block of the records and shuffles within it, so the
examples in global batch t depend on the process count: a run on 2 hosts x 4 devices does not see the batches a
run on 1 host x 8 devices sees, and a checkpoint's iterator state cannot move between the two.

`GlobalBatchSampler` instead fixes one global sequence (shuffled by seed, repeated by epoch) and cuts it into
global batches of B records; a host reads a fixed sorted list of rows of every global batch: the rows its devices
hold under the trainer's batch sharding (`flamingo_jax.data.host_rows`), so hosts whose devices are replicas of
each other (a `tensor` axis across hosts) read the same rows. Each record's random stream (crop, flip, window,
link_next) is seeded by its *global* position. So global batch t holds the same records, preprocessed the same
way, for any number of hosts and any mesh, and the position in the stream after t steps is the same everywhere:
`grain_state_after` rebuilds a host's Grain state from the step count alone, which is what lets a checkpoint
written by one layout resume on another.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grain.python as grain


class GlobalBatchSampler:
    """A Grain sampler over one host's `rows` of each global batch of `global_batch_size` records.

    Grain's DataLoader hands local index j to worker j % W, and each worker batches its records in order, so the
    loader's output batch t comes from worker t % W. The index arithmetic in `global_position` undoes that, so
    output batch t is global batch t whatever the worker count; its rows come in the order of `rows` (sorted).
    """

    def __init__(
        self,
        num_records: int,
        *,
        global_batch_size: int,
        rows: Sequence[int] | None = None,
        worker_count: int,
        shuffle: bool,
        num_epochs: int | None,
        seed: int,
    ):
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        rows = tuple(sorted({int(r) for r in (range(global_batch_size) if rows is None else rows)}))
        if not rows or rows[0] < 0 or rows[-1] >= global_batch_size:
            raise ValueError(f"rows must be a non-empty subset of [0, {global_batch_size}), got {rows}")
        self._global = grain.IndexSampler(
            num_records=num_records,
            shard_options=grain.NoSharding(),
            shuffle=shuffle,
            num_epochs=num_epochs,
            seed=seed,
        )
        self.rows, self.global_batch_size, self.worker_count = rows, global_batch_size, worker_count
        self.host_batch_size = len(rows)
        self._workers = max(worker_count, 1)
        full_batches = len(self._global) // global_batch_size  # the last partial global batch is dropped
        # With W workers, worker w makes batches w, w + W, ...: whole rounds only, so every worker's index range
        # maps inside the global order (a finite split with workers drops up to W - 1 more batches).
        self._len = (full_batches // self._workers) * self._workers * self.host_batch_size
        self._desc = (
            f"GlobalBatchSampler(num_records={num_records}, global_batch_size={global_batch_size}, "
            f"rows={format_rows(rows)}, worker_count={worker_count}, shuffle={shuffle}, num_epochs={num_epochs}, "
            f"seed={seed})"
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
        return step * self.global_batch_size + self.rows[m % b]

    def __getitem__(self, local_index: int) -> Any:
        if not 0 <= local_index < self._len:
            raise IndexError(f"index {local_index} out of range [0, {self._len})")
        # The metadata's index and rng are those of the global position: the same record gets the same
        # augmentation on any number of hosts.
        return self._global[self.global_position(local_index)]

    def adapt_state(self, grain_state: str, batches: int) -> str:
        """Grain DataLoader state (JSON) for this sampler after `batches` batches.

        A state saved with this very sampler is returned unchanged; one saved with other rows (another process
        count, process or mesh), batch size or worker count is rebuilt from the number of batches consumed (the
        global step).
        """
        state = json.loads(grain_state)
        if state.get("sampler") == repr(self):
            return grain_state
        state.update(grain_state_after(batches, self.host_batch_size, self.worker_count))
        state["sampler"] = repr(self)
        return json.dumps(state, indent=4)


def format_rows(rows: Sequence[int]) -> str:
    """Sorted rows as compact ranges, e.g. "0-3,8-11": short enough for every saved iterator state."""
    parts, i = [], 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        parts.append(str(rows[i]) if i == j else f"{rows[i]}-{rows[j]}")
        i = j + 1
    return ",".join(parts)


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
