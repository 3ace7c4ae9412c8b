"""What the user sees: a progress bar, metrics as JSONL and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import tqdm
from absl import logging as absl_logging
from etils import epath


class _LibraryInfoFilter(logging.Filter):
    """Drops INFO lines from TFDS (it logs 'Load dataset info' for every loader, at every evaluation) and Orbax
    (about 40 lines per checkpoint saved)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(lib in record.pathname for lib in _QUIET_LIBRARIES)


_QUIET_LIBRARIES = ("tensorflow_datasets", "/orbax/")


def quiet_library_logs() -> None:
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())


def _scalar(v: Any) -> float | int:
    v = np.asarray(v)
    return v.item() if v.size == 1 else float(v.mean())


def drop_rows_after(workdir: str | os.PathLike, step: int) -> None:
    """Removes `metrics.jsonl` rows after `step` (and a line cut short by a kill), so that a run resumed from
    its step-`step` checkpoint logs each later step once. TensorBoard needs nothing: it keeps the newest write."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricWriter:
    """Appends `{"step": N, name: value, ...}` lines to `workdir/metrics.jsonl` and writes TensorBoard scalars
    under `workdir/tensorboard`. A no-op on processes other than 0, so callers need no `if`."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (workdir / "metrics.jsonl").open("a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.fspath(workdir / "tensorboard"), flush_secs=30)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class Progress:
    """A tqdm bar over optimiser steps: step, loss per dataset, examples/s and ETA."""

    def __init__(self, total: int, initial: int, *, enabled: bool = True):
        self.bar = tqdm.tqdm(
            total=total,
            initial=initial,
            disable=not enabled,
            dynamic_ncols=True,
            unit="step",
            smoothing=0.1,
            mininterval=1.0,
        )
        self._last = time.perf_counter()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        self.bar.update(step - self.bar.n)
        if metrics:
            shown = {
                "loss": metrics.get("train/loss"),
                "ex/s": metrics.get("perf/examples_per_s"),
                "eval": metrics.get("eval/loss"),
            }
            shown.update({k.removeprefix("train/loss/"): v for k, v in metrics.items() if k.startswith("train/loss/")})
            self.bar.set_postfix({k: f"{_scalar(v):.3g}" for k, v in shown.items() if v is not None}, refresh=False)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
