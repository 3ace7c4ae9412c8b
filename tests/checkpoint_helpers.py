"""A tiny trainer config for checkpoint and export tests, usable as a `--config` file, and a runner for it.

    python tests/checkpoint_helpers.py --config=tests/checkpoint_helpers.py:DATA_ROOT --workdir=DIR [...]

runs `flamingo_jax.train` like `python -m flamingo_jax.train`; with FLAMINGO_TEST_STEP_SLEEP=seconds each logged
step sleeps that long, so that a test can signal the run while it is still training.
"""

import fcntl
import os
import pathlib
import subprocess
import sys
import time

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6  # 2N
EVERY = 3  # N


def get_config(root: str) -> ml_collections.ConfigDict:
    from flamingo_jax.models.flamingo import DEFAULT_TRAINABLE
    from tests.test_train import tiny_config

    c = tiny_config(root)
    for name in list(c.data.datasets):  # two datasets: two iterator states, half the compile time of four
        if name not in ("m3w", "ltip"):
            del c.data.datasets[name]
    c.model.trainable = DEFAULT_TRAINABLE  # the paper's split: frozen vision encoder and LM
    c.model.allow_random_towers = True  # ... both random: the tests check mechanics, not quality
    c.train.update(steps=STEPS, log_every=1, eval_every=0)
    c.mesh = (2, 2, 2)
    c.checkpoint.every_steps = EVERY
    return c


def env(devices: int = 8, cache_dir: str | None = None) -> dict[str, str]:
    """Environment for a subprocess: `devices` CPU devices, the repo importable, and a shared compilation cache
    (every run compiles the same programs; the cache gives the same executables, so the numbers are unchanged)."""
    e = dict(os.environ)
    e.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        PYTHONPATH=REPO + os.pathsep + e.get("PYTHONPATH", ""),
    )
    if cache_dir:
        e.update(
            JAX_COMPILATION_CACHE_DIR=cache_dir,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return e


def command(root: str, workdir: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        os.path.join(REPO, "tests", "checkpoint_helpers.py"),
        f"--config={os.path.join(REPO, 'tests', 'checkpoint_helpers.py')}:{root}",
        f"--workdir={workdir}",
        *overrides,
    ]


def start(
    root: str,
    workdir: str,
    *overrides: str,
    log: str,
    devices: int = 8,
    cache_dir: str | None = None,
    step_sleep: float = 0.0,
) -> subprocess.Popen:
    e = env(devices, cache_dir)
    if step_sleep:
        e["FLAMINGO_TEST_STEP_SLEEP"] = str(step_sleep)
    with open(log, "w") as f:
        return subprocess.Popen(command(root, workdir, *overrides), env=e, stdout=f, stderr=subprocess.STDOUT)


def run(root: str, workdir: str, *overrides: str, log: str, **kw) -> None:
    p = start(root, workdir, *overrides, log=log, **kw)
    if p.wait() != 0:
        raise AssertionError(f"run failed ({p.returncode}):\n" + pathlib.Path(log).read_text()[-5000:])


def losses(workdir: str) -> dict[int, float]:
    """{step: train/loss} from metrics.jsonl (the last row for each step)."""
    import json

    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # the line a kill cut short
                continue
            if "train/loss" in row:
                out[row["step"]] = row["train/loss"]
    return out


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def shared_reference(tmp_path_factory) -> tuple[str, str, str]:
    """(data root, reference workdir, compilation cache) for the session: a run of STEPS steps with checkpoints at
    EVERY and STEPS, made once and reused by test_checkpoint.py and test_export.py."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's directory, shared by its workers (pytest -n): one reference run
    root, workdir, cache = (str(base / n) for n in ("ckpt_data", "ckpt_reference", "ckpt_jax_cache"))
    with open(base / "ckpt_reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be making it: wait, then reuse
        if not os.path.exists(os.path.join(workdir, "done")):
            from flamingo_jax.data import synthetic

            synthetic.prepare_synthetic(root, num_train=64, num_eval=16, image_size=32)
            run(root, workdir, log=workdir + ".log", cache_dir=cache)
            pathlib.Path(workdir, "done").touch()
    return root, workdir, cache


def small_config(**checkpoint: object) -> ml_collections.ConfigDict:
    """What `checkpoint.Checkpoints` reads of a config, for tests on small trees."""
    from flamingo_jax.config import base_config

    c = ml_collections.ConfigDict({"train": {"steps": 10}, "checkpoint": base_config().checkpoint.to_dict()})
    c.checkpoint.update(checkpoint)
    return c


class FakeIterator:
    """Quacks like a data loader iterator as far as checkpoints are concerned."""

    def __init__(self, position: int = 0):
        self.position = position

    def get_state(self) -> bytes:
        return f'{{"position": {self.position}}}'.encode()

    def set_state(self, state: str) -> None:
        import json

        self.position = json.loads(state)["position"]


def _main() -> None:
    from absl import app

    from flamingo_jax import metrics, train

    sleep = float(os.environ.get("FLAMINGO_TEST_STEP_SLEEP", "0"))
    if sleep:
        write = metrics.MetricWriter.write

        def slow_write(self, step, values):
            write(self, step, values)
            time.sleep(sleep)

        metrics.MetricWriter.write = slow_write
    app.run(train.main)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    _main()
