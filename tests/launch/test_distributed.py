"""flamingo_jax.distributed: where the job description comes from, the topology log, and failures that end the
job within bounded time instead of hanging (real 2-process JAX jobs over gloo, each a few seconds)."""

import sys

import jax
import pytest

from flamingo_jax import distributed, sharding
from tests.launch import helpers

OPTS = distributed.Options()


def test_single_process_unless_something_says_otherwise():
    assert distributed.plan(OPTS, {}) is None
    assert (
        distributed.plan(
            OPTS, {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
        )
        is None
    )  # a one-task SLURM job (salloc, interactive)
    assert distributed.plan(distributed.Options(mode="off", num_processes=2, process_id=0), {}) is None


def test_flags_win_over_environment():
    opts = distributed.Options(coordinator_address="h0:1234", num_processes=4, process_id=3)
    env = {"COORDINATOR_ADDRESS": "other:1", "NUM_PROCESSES": "9", "PROCESS_ID": "1"}
    p = distributed.plan(opts, env)
    assert (p.coordinator_address, p.num_processes, p.process_id) == ("h0:1234", 4, 3)
    p = distributed.plan(OPTS, env)
    assert (p.coordinator_address, p.num_processes, p.process_id, p.source) == ("other:1", 9, 1, "env")


def test_jobset_environment_names_pod_zero_as_coordinator():
    env = {
        "JOBSET_NAME": "flamingo",
        "REPLICATED_JOB_NAME": "workers",
        "JOB_INDEX": "0",
        "JOB_COMPLETION_INDEX": "5",
        "NUM_PROCESSES": "8",
        "COORDINATOR_PORT": "8476",
    }
    p = distributed.plan(OPTS, env)
    assert (p.coordinator_address, p.num_processes, p.process_id) == ("flamingo-workers-0-0.flamingo:8476", 8, 5)
    assert distributed.plan(OPTS, {**env, "COORDINATOR_ADDRESS": "10.0.0.2:99"}).coordinator_address == "10.0.0.2:99"
    with pytest.raises(ValueError, match="replicas: 1"):
        distributed.plan(OPTS, {**env, "JOB_INDEX": "1"})


def test_cluster_environments_are_left_to_jax_detection():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    p = distributed.plan(OPTS, slurm)
    assert p is not None and p.coordinator_address is None and "SLURM" in p.source
    p = distributed.plan(distributed.Options(mode="on"), {})  # Cloud TPU VM: only the metadata server knows
    assert p == distributed.Plan(None, None, None, "JAX auto-detection (TPU / SLURM / MPI)")


def test_contradictions_are_errors():
    with pytest.raises(ValueError, match="not in"):
        distributed.plan(distributed.Options(coordinator_address="h:1", num_processes=2, process_id=2), {})
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.plan(distributed.Options(coordinator_address="h", num_processes=2, process_id=0), {})
    with pytest.raises(ValueError, match="NUM_PROCESSES"):
        distributed.plan(OPTS, {"NUM_PROCESSES": "two"})


def test_topology_names_processes_devices_and_mesh():
    mesh = sharding.make_mesh((2, 2, 2))
    text = distributed.topology(mesh)
    assert "process 0 of 1" in text and f"local devices {jax.local_device_count()}" in text
    assert "global devices 8 over 1 processes" in text
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in text and "mesh axis 'data' size 2 spans 1" in text


def _workers(tmp_path, fail: str, heartbeat: int = 5) -> tuple[list, list]:
    cmds = helpers.local.commands(
        2,
        helpers.local.free_port(),
        "tests.launch.collective_worker",
        [f"--fail={fail}", f"--distributed_heartbeat_timeout={heartbeat}", "--distributed_init_timeout=60"],
    )
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    return [helpers.start(c, log, devices=2) for c, log in zip(cmds, logs)], logs


@pytest.mark.slow
def test_killed_process_ends_the_job(tmp_path):
    """SIGKILL in the middle of the collectives: the survivor aborts, well within the heartbeat timeout."""
    procs, logs = _workers(tmp_path, "kill")
    try:
        helpers.wait_exit(procs[1], 60)
        assert procs[1].returncode == -9
        waited = helpers.wait_exit(procs[0], 5 + 20)
        assert procs[0].returncode != 0
        out = logs[0].read_text()
        assert "iteration 5" in out
        # Gloo sees the closed connection, or the coordination service misses the heartbeats: either is named.
        assert "Connection closed by peer" in out or "stopped sending heartbeats" in out, out[-2000:]
        print(f"survivor exited {waited:.1f} s after the kill")
    finally:
        helpers.kill_all(procs)


@pytest.mark.slow
def test_failing_process_exits_at_once_and_takes_the_job_down(tmp_path):
    """An exception in one process: without run_or_die it would wait in JAX's shutdown barrier for peers that
    wait for it in a collective. With it, it exits 1 at once, naming the error, and the peer is told why and
    exits too, long before the (here 60 s) heartbeat timeout."""
    procs, logs = _workers(tmp_path, "raise", heartbeat=60)
    try:
        helpers.wait_exit(procs[1], 60)
        waited = helpers.wait_exit(procs[0], 15)
        out1, out0 = logs[1].read_text(), logs[0].read_text()
        assert procs[1].returncode == 1, out1[-3000:]
        assert procs[0].returncode == 1, out0[-3000:]
        assert "process 1 of 2 failed: RuntimeError: failing on purpose" in out1, out1[-2000:]
        assert "stopping: process 1 of 2 failed with RuntimeError: failing on purpose" in out0, out0[-2000:]
        print(f"peer exited {waited:.1f} s after the failing process")
    finally:
        helpers.kill_all(procs)


@pytest.mark.slow
def test_missing_process_fails_the_join_within_the_init_timeout(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "tests.launch.collective_worker",
        f"--coordinator_address=127.0.0.1:{helpers.local.free_port()}",
        "--num_processes=2",
        "--process_id=0",
        "--distributed_init_timeout=3",
    ]
    log = tmp_path / "alone.log"
    proc = helpers.start(cmd, log, devices=1)
    try:
        helpers.wait_exit(proc, 45)
        out = log.read_text()
        assert proc.returncode != 0
        assert "joining as process 0 of 2" in out and "all must join within 3 s" in out
        assert "DEADLINE_EXCEEDED" in out or "Deadline Exceeded" in out, out[-2000:]
    finally:
        helpers.kill_all([proc])
