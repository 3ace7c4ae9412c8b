"""Starting trainer and worker processes the way launch/local.py does, and reading their logs."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_local_launcher():
    """launch/local.py as a module (launch/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("launch_local", REPO / "launch" / "local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local = load_local_launcher()


def env(devices: int, **extra: str) -> dict[str, str]:
    e = local.child_env(devices)
    # The test session's precision (tests/conftest.py), so that subprocess numbers compare with in-process ones.
    e["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    e.update(extra)
    return e


def start(cmd: list[str], log: pathlib.Path, devices: int, **extra_env: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env(devices, **extra_env), stdout=f, stderr=subprocess.STDOUT)


def wait_for(path: pathlib.Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until `text` appears in the file at `path`; fails if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before printing {text!r}:\n{path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not printed within {timeout} s:\n{path.read_text()[-3000:]}")


def wait_exit(proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until proc exits; fails (and kills it) past `timeout`."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running {timeout} s later: the job hangs") from None
    return time.monotonic() - t0


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def launch_local(
    processes: int, devices: int, module: str, args: list[str], timeout: float = 600, **extra_env: str
) -> str:
    """Runs `module` as launch/local.py does (N processes x M CPU devices, gloo) to completion; returns its
    prefixed output. No persistent compilation cache unless extra_env sets one: multi-process CPU runs must not
    share one (see tests/launch/test_multihost_train.py)."""
    cmd = [
        sys.executable,
        str(REPO / "launch" / "local.py"),
        f"--num_processes={processes}",
        f"--devices_per_process={devices}",
        f"--module={module}",
        "--",
        *args,
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env(1, **extra_env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    return r.stdout


def shared_dir(tmp_path_factory, name: str, make) -> pathlib.Path:
    """A directory that `make(path)` fills once per test session, however many pytest-xdist workers ask for it
    (the first makes it under a file lock; the others wait, then reuse it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's directory, shared by its workers
    path = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "done").exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed attempt left
            path.mkdir()
            make(path)
            (path / "done").touch()
    return path


def shared_two_by_four(tmp_path_factory, steps: int = 4, datasets: str = "ltip") -> pathlib.Path:
    """The 2 processes x 4 devices training run of tests/launch/test_multihost_train.py (the same command: the tiny
    config on `datasets`, `steps` steps, checkpoints every 2), made once per test session. Returns its directory:
    `workdir/`, `data/` (the synthetic data) and `train.log` (the launcher's prefixed output). No compilation
    cache (a multi-process run)."""

    def make(path: pathlib.Path) -> None:
        from flamingo_jax.data import synthetic

        data = path / "data"
        synthetic.prepare_synthetic(str(data), num_train=64, num_eval=16, image_size=32)  # as tiny_config says
        args = [
            f"--config=tests/launch/tiny_config.py:{data},{datasets}",
            f"--workdir={path / 'workdir'}",
            f"--config.train.steps={steps}",
            "--config.checkpoint.every_steps=2",
            "--distributed_heartbeat_timeout=30",
        ]
        (path / "train.log").write_text(launch_local(2, 4, "flamingo_jax.train", args))

    return shared_dir(tmp_path_factory, f"multihost_two_by_four_{steps}_{datasets}", make)
