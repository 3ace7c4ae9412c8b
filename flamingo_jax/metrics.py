"""What the user sees: a progress bar, metrics as JSONL and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import tqdm
from etils import epath


def _scalar(v: Any) -> float | int:
    v = np.asarray(v)
    return v.item() if v.size == 1 else float(v.mean())


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
        from tensorboardX import SummaryWriter  # noqa: PLC0415 (imported only where it writes)

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
        self.bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                             unit="step", smoothing=0.1, mininterval=1.0)
        self._last = time.perf_counter()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        self.bar.update(step - self.bar.n)
        if metrics:
            shown = {k.split("/")[-1] if k.startswith("train/loss/") else k.split("/")[-1]: v
                     for k, v in metrics.items()
                     if k.startswith("train/loss") or k in ("perf/examples_per_s", "eval/loss")}
            self.bar.set_postfix({k: f"{_scalar(v):.3g}" for k, v in shown.items()}, refresh=False)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
