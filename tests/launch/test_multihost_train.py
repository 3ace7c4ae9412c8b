"""The trainer as a multi-process job (launch/local.py): 2 processes x 4 CPU devices give the per-step losses of
1 process x 8 devices, log their topology, write metrics once, resume on a different process count, and a
killed process ends the job instead of hanging it. 4 processes x 2 devices on a mesh whose `fsdp` and `tensor`
axes span processes (each process loads the rows its devices hold, flamingo_jax.data.host_rows) give the same
losses, and their checkpoint resumes on another mesh.

Each run is a real `python -m flamingo_jax.train` on the tiny demo config (tests/launch/tiny_config.py) with one
of its four datasets: compile time grows with each dataset's forward and backward pass, and the multi-host code
paths are the same for one (tests/launch/test_global_batches.py covers the record order for any host count). The
1-process runs share a persistent compilation cache, so a run that repeats an earlier program (the resume) skips
most of its compile. The 2 x 4 run is made once per session (helpers.shared_two_by_four) and also serves
tests/launch/test_multihost_export.py. The multi-process runs do without the cache: only process 0 writes it
and, on CPUs, a multi-process program's cache key differs between processes, so process 0 alone would find a
program that an earlier multi-process run compiled, and run ahead of the others past the 30 s within which all
must meet at their first collective (a gloo context initialization timeout).
"""

import json
import shutil
import signal
import subprocess
import sys

import pytest

from tests.launch import helpers

pytestmark = pytest.mark.slow

STEPS = 4
DATASETS = "ltip"
RTOL = 1e-5


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """The 2 x 4 run and its data, made once per test session (tests/launch/test_multihost_export.py exports it)."""
    return helpers.shared_two_by_four(tmp_path_factory, steps=STEPS, datasets=DATASETS)


@pytest.fixture(scope="module")
def data_root(shared_run) -> str:
    return str(shared_run / "data")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax_cache"))


def launch(processes: int, devices: int, workdir, data_root: str, cache_dir: str | None, *extra: str) -> str:
    """Runs launch/local.py to completion; returns its (prefixed) output. No cache_dir: no compilation cache."""
    cmd = [
        sys.executable,
        str(helpers.REPO / "launch" / "local.py"),
        f"--num_processes={processes}",
        f"--devices_per_process={devices}",
        "--",
        f"--config=tests/launch/tiny_config.py:{data_root},{DATASETS}",
        f"--workdir={workdir}",
        f"--config.train.steps={STEPS}",
        "--distributed_heartbeat_timeout=30",
        *extra,
    ]
    cache = dict(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    env = helpers.env(1, **(cache if cache_dir else {}))
    r = subprocess.run(cmd, cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    return r.stdout


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice (by two processes?): {steps}"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def one_by_eight(tmp_path_factory, data_root, cache_dir):
    workdir = tmp_path_factory.mktemp("one_by_eight")
    return workdir, launch(1, 8, workdir, data_root, cache_dir)


@pytest.fixture(scope="module")
def two_by_four(shared_run):
    """2 processes x 4 devices, checkpoints every 2 steps (helpers.shared_two_by_four: no compilation cache)."""
    return shared_run / "workdir", (shared_run / "train.log").read_text()


def assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert got.keys() == want.keys(), (got, want)
    for step in got:
        assert abs(got[step] - want[step]) <= RTOL * abs(want[step]), (step, got[step], want[step])


def test_two_processes_train_like_one(one_by_eight, two_by_four):
    want, got = losses(one_by_eight[0]), losses(two_by_four[0])
    assert sorted(want) == list(range(1, STEPS + 1))  # log_every=1, and process 1 wrote no rows
    assert_close(got, want)
    print("losses 1x8:", want, "\nlosses 2x4:", got)


def test_topology_is_logged_by_every_process(two_by_four):
    out = two_by_four[1]
    for i in range(2):
        assert f"[{i}] " in out
        lines = [line for line in out.splitlines() if line.startswith(f"[{i}] ") and "topology:" in line]
        text = "\n".join(lines)
        assert f"process {i} of 2" in text and "local devices 4" in text, out[-4000:]
        assert "global devices 8 over 2 processes" in text
        assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in text and "'data' size 8 spans 2 process(es)" in text
    assert "[local] exit 0" in out


def test_checkpoint_of_two_processes_resumes_on_one(one_by_eight, two_by_four, data_root, cache_dir, tmp_path):
    """The 2 x 4 run as if stopped after its step-2 checkpoint, resumed as 1 process x 8 devices: steps 3 and 4
    give the losses of the uninterrupted 1 x 8 run."""
    workdir = tmp_path / "resumed"
    shutil.copytree(two_by_four[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    assert (workdir / "checkpoints" / "2").is_dir()
    out = launch(1, 8, workdir, data_root, cache_dir, "--config.checkpoint.every_steps=2")
    assert "resumed from" in out and "(step 2)" in out, out[-4000:]
    want = losses(one_by_eight[0])
    assert_close(losses(workdir), want)


@pytest.fixture(scope="module")
def four_by_two(tmp_path_factory, data_root):
    """4 processes x 2 devices on mesh (1, 2, 4): `fsdp` and `tensor` both span processes, so processes 0 and 1
    (one `tensor` group) load the same rows, 0-3 of each global batch, and 2 and 3 load rows 4-7."""
    workdir = tmp_path_factory.mktemp("four_by_two")
    out = launch(4, 2, workdir, data_root, None, "--config.mesh=(1,2,4)", "--config.checkpoint.every_steps=2")
    return workdir, out


def test_four_processes_with_fsdp_and_tensor_across_them_train_like_one(one_by_eight, four_by_two):
    assert_close(losses(four_by_two[0]), losses(one_by_eight[0]))
    out = four_by_two[1]
    assert "'fsdp' size 2 spans 2 process(es)" in out and "'tensor' size 4 spans 2 process(es)" in out


def test_their_checkpoint_resumes_on_another_mesh(one_by_eight, four_by_two, data_root, cache_dir, tmp_path):
    """The (1, 2, 4) run's step-2 checkpoint resumed by 1 x 8 on (8, 1, 1) (the program of `one_by_eight`, from
    the compilation cache): the data iterators move from 4 rows of each global batch to all 8, and steps 3 and 4
    give the losses of the uninterrupted run. tests/launch/test_global_batches.py moves a state between meshes on
    the same processes."""
    workdir = tmp_path / "resumed"
    shutil.copytree(four_by_two[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    out = launch(1, 8, workdir, data_root, cache_dir, "--config.checkpoint.every_steps=2")
    assert "resumed from" in out and "(step 2)" in out, out[-4000:]
    assert_close(losses(workdir), losses(one_by_eight[0]))


def test_killed_trainer_process_ends_the_job(data_root, tmp_path):
    """SIGKILL to process 1 once both have joined: process 0 aborts within the heartbeat timeout (5 s here),
    with JAX's message naming the dead process, instead of waiting for it forever."""
    cmds = helpers.local.commands(
        2,
        helpers.local.free_port(),
        "flamingo_jax.train",
        [
            f"--config=tests/launch/tiny_config.py:{data_root},{DATASETS}",
            f"--workdir={tmp_path / 'w'}",
            "--config.train.steps=100",
            "--distributed_heartbeat_timeout=5",
        ],
    )
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [helpers.start(c, log, devices=4) for c, log in zip(cmds, logs)]
    try:
        for p, log in zip(procs, logs):
            helpers.wait_for(log, "topology: mesh", p, timeout=120)
        procs[1].send_signal(signal.SIGKILL)
        waited = helpers.wait_exit(procs[0], 5 + 25)
        out = logs[0].read_text()
        assert procs[0].returncode != 0
        assert "stopped sending heartbeats" in out or "Connection closed by peer" in out, out[-3000:]
        print(f"process 0 exited {waited:.1f} s after process 1 was killed")
    finally:
        helpers.kill_all(procs)
