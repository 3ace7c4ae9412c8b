"""Starting trainer and worker processes the way launch/local.py does, and reading their logs."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
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
