"""Multi-host start-up: `jax.distributed` from flags or the environment, bounded timeouts, topology log.

Every process of a multi-host job runs the same program (JAX's multi-controller runtime). Before JAX touches a
device, each process must join the job: `initialize(options)` finds the coordinator address, process count and
process id, in this order of precedence:

1. flags: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (what launch/local.py passes);
2. environment, explicit: `COORDINATOR_ADDRESS`, `NUM_PROCESSES`, `PROCESS_ID`;
3. environment, Kubernetes JobSet (launch/jobset.yaml sets these from the pod's labels and annotations):
   `JOBSET_NAME` and `JOB_COMPLETION_INDEX` (the process id) with `NUM_PROCESSES`; the coordinator is pod 0 of
   the replicated job, `{JOBSET_NAME}-{REPLICATED_JOB_NAME}-0-0.{JOBSET_NAME}:{COORDINATOR_PORT}` (JobSet's
   headless service; REPLICATED_JOB_NAME defaults to `workers`, COORDINATOR_PORT to 8476). One replicated job
   with `replicas: 1` and one pod per host is assumed;
4. JAX's own detection, for whatever is still unknown: Cloud TPU VMs and GKE TPU pods (the TPU metadata or
   `TPU_WORKER_HOSTNAMES`), SLURM (`SLURM_*`, one process per task), Open MPI.

`--distributed` says when to join: `auto` (default) joins when any of 1-3 is set or the environment is a
multi-process SLURM, Open MPI or GKE TPU job, else runs as a single process; `on` always joins (use it on Cloud
TPU VM pods, whose detection needs the metadata server); `off` never does.

Failure is bounded, never a hang: processes that do not all arrive within `--distributed_init_timeout` seconds
abort; a process that stops heartbeating (killed, OOM, lost host) makes the others abort within
`--distributed_heartbeat_timeout` seconds (JAX's coordination service); and under `run_or_die`, a process whose
Python code raises exits at once, instead of waiting in JAX's shutdown barrier for peers that wait for it in a
collective, after writing its error to the coordination service's key-value store, where a thread in every other
process reads it and exits too, naming the failed process and its error.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging as py_logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from absl import flags, logging

MODES = ("auto", "on", "off")
DEFAULT_COORDINATOR_PORT = 8476
DEFAULT_REPLICATED_JOB = "workers"

_MODE = flags.DEFINE_enum("distributed", "auto", MODES, "Join a multi-process JAX job: auto | on | off.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordination service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout", 300, "Seconds to wait for all processes to join before failing."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "distributed_heartbeat_timeout", 100, "Seconds without a heartbeat after which a process counts as dead."
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "distributed_shutdown_timeout", 60, "Seconds the final barrier waits for the other processes at exit."
)

T = TypeVar("T")

# Every environment variable `plan` (or JAX's detection behind it) reads, for messages.
_ENV_KEYS = (
    *("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID"),
    *("JOBSET_NAME", "REPLICATED_JOB_NAME", "JOB_INDEX", "JOB_COMPLETION_INDEX", "COORDINATOR_PORT"),
    *("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"),
    *("TPU_WORKER_ID", "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS"),
)


@dataclasses.dataclass(frozen=True)
class Options:
    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout_s: int = 300
    heartbeat_timeout_s: int = 100
    shutdown_timeout_s: int = 60


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` will pass to `jax.distributed.initialize`; None fields are left to JAX's detection."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    source: str  # where the values came from, for the log


def options_from_flags() -> Options:
    return Options(
        mode=_MODE.value,
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        init_timeout_s=_INIT_TIMEOUT.value,
        heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
        shutdown_timeout_s=_SHUTDOWN_TIMEOUT.value,
    )


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _cluster_env_present(env: Mapping[str, str]) -> str | None:
    """A multi-process job that JAX itself can describe, from environment variables only (no network)."""
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")) and (
        (_int_env(env, "SLURM_NTASKS") or 1) > 1
    ):
        return "SLURM"
    if (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "Open MPI"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "GKE TPU"
    return None


def plan(options: Options, env: Mapping[str, str] | None = None) -> Plan | None:
    """Resolves flags and environment into a Plan, or None for a single-process run. Raises on contradictions."""
    env = os.environ if env is None else env
    if options.mode not in MODES:
        raise ValueError(f"--distributed={options.mode!r}; choose one of {MODES}")
    if options.mode == "off":
        return None
    coordinator, count, pid = options.coordinator_address, options.num_processes, options.process_id
    sources = ["flags"] if any(v is not None for v in (coordinator, count, pid)) else []
    if env.get("COORDINATOR_ADDRESS") or env.get("NUM_PROCESSES") or env.get("PROCESS_ID"):
        sources.append("env")
        coordinator = coordinator or env.get("COORDINATOR_ADDRESS") or None
        count = count if count is not None else _int_env(env, "NUM_PROCESSES")
        pid = pid if pid is not None else _int_env(env, "PROCESS_ID")
    if env.get("JOBSET_NAME") and env.get("JOB_COMPLETION_INDEX", "") != "":
        sources.append("JobSet")
        if coordinator is None:
            name = env["JOBSET_NAME"]
            rjob = env.get("REPLICATED_JOB_NAME") or DEFAULT_REPLICATED_JOB
            port = _int_env(env, "COORDINATOR_PORT") or DEFAULT_COORDINATOR_PORT
            coordinator = f"{name}-{rjob}-0-0.{name}:{port}"
        if pid is None:
            pid = _int_env(env, "JOB_COMPLETION_INDEX")
        if (_int_env(env, "JOB_INDEX") or 0) != 0:
            raise ValueError("JobSet: JOB_INDEX != 0; use one replicated job with replicas: 1 (launch/jobset.yaml)")
    cluster = _cluster_env_present(env)
    if not sources and cluster is None and options.mode == "auto":
        return None  # nothing says this is a multi-process job
    if count is not None and count < 1:
        raise ValueError(f"num_processes must be >= 1, got {count}")
    if count is not None and pid is not None and not 0 <= pid < count:
        raise ValueError(f"process_id {pid} is not in [0, num_processes={count})")
    if coordinator is not None and ":" not in coordinator:
        raise ValueError(f"coordinator address {coordinator!r} needs a port: HOST:PORT")
    if count == 1 and options.mode == "auto":
        return None
    source = "+".join(sources) or f"JAX auto-detection ({cluster or 'TPU / SLURM / MPI'})"
    if sources and None in (coordinator, count, pid):
        source += " + JAX auto-detection"
    return Plan(coordinator, count, pid, source)


def initialize(options: Options, env: Mapping[str, str] | None = None) -> Plan | None:
    """Joins the multi-process job described by `options` and the environment (module docstring); a no-op
    returning None for a single-process run. Must run before anything touches a JAX device."""
    p = plan(options, env)
    if p is None:
        logging.info("single-process run (--distributed=%s found no multi-process job)", options.mode)
        return None
    logging.info(
        "jax.distributed: joining as process %s of %s, coordinator %s (from %s); all must join within %d s, "
        "a process silent for %d s fails the job",
        "?" if p.process_id is None else p.process_id,
        "?" if p.num_processes is None else p.num_processes,
        p.coordinator_address or "?",
        p.source,
        options.init_timeout_s,
        options.heartbeat_timeout_s,
    )
    _flush_logs()  # If the join times out, JAX aborts the process (C++ LOG(FATAL)): this line must be out first.
    try:
        jax.distributed.initialize(
            coordinator_address=p.coordinator_address,
            num_processes=p.num_processes,
            process_id=p.process_id,
            initialization_timeout=options.init_timeout_s,
            heartbeat_timeout_seconds=options.heartbeat_timeout_s,
            shutdown_timeout_seconds=options.shutdown_timeout_s,
        )
    except ValueError as e:  # JAX could not fill in what flags and environment left open
        raise ValueError(
            f"cannot join a multi-process job ({p.source}): {e}. Pass --coordinator_address, --num_processes and "
            f"--process_id, set COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID or the JobSet variables, or use "
            f"--distributed=off for one process. Relevant environment: {describe_env() or 'none set'}"
        ) from e
    logging.info("jax.distributed: joined as process %d of %d", jax.process_index(), jax.process_count())
    _start_failure_watch()
    return p


def run_or_die(fn: Callable[[], T]) -> T:
    """Runs fn; in a multi-process job, an exception in it ends this process at once with a clear message.

    Without this, a failing process waits in JAX's shutdown barrier (atexit) for peers that are themselves
    blocked in a collective waiting for it: the job hangs until the barrier times out. Instead it writes its
    error to the coordination service, which the other processes' watch threads read (they exit at once, naming
    it), and exits without the barrier; should the store be unreachable, the peers still stop on the missed
    heartbeats.
    """
    try:
        return fn()
    except Exception as e:
        if not _multi_process():
            raise
        me, n = jax.process_index(), jax.process_count()
        what = f"{type(e).__name__}: {_first_line(e)}"
        logging.exception(
            "process %d of %d failed: %s. Stopping this process now, and the others with it. If this is a "
            "collective or connection error, another process probably died first: see its log.",
            me,
            n,
            what,
        )
        _flush_logs()
        _announce_failure(me, what)
        os._exit(1)


# A failing process writes its error under this key of the coordination service's key-value store; every other
# process waits on the key in a thread and exits at once, naming the failed process. Without it the others learn
# only from missed heartbeats (--distributed_heartbeat_timeout later) with no word of the cause.
_FAILED_KEY = "flamingo_jax/failed_process"
_stopping = threading.Event()
_WATCH_POLL_MS = 1000


def _client() -> Any:
    from jax._src import distributed as _dist

    return _dist.global_state.client


def _announce_failure(me: int, what: str) -> None:
    client = _client()
    # Raises when another process failed first and wrote the key: the others are already on their way out.
    with contextlib.suppress(Exception):
        client.key_value_set(_FAILED_KEY, f"{me}\t{what}")
        if me == 0:
            time.sleep(2.0)  # process 0 hosts the key-value store: let the others read the key before it goes


def _start_failure_watch() -> None:
    client, me = _client(), jax.process_index()
    if client is None or jax.process_count() == 1:
        return

    def watch() -> None:
        while not _stopping.is_set():
            t0 = time.monotonic()
            try:
                # Short waits: at exit the thread must be out of this C++ call before the interpreter finalises
                # (a thread still inside it then aborts the process), so _stop_watch can join it quickly.
                value = client.blocking_key_value_get(_FAILED_KEY, _WATCH_POLL_MS)
            except Exception:  # a timeout (nothing failed), or the service is going away
                if time.monotonic() - t0 < 0.5:
                    _stopping.wait(1.0)  # an immediate error: the service is gone; JAX's own checks take over
                continue
            who, _, what = value.partition("\t")
            if _stopping.is_set() or who == str(me):
                return
            logging.error("stopping: process %s of %d failed with %s (see its log)", who, jax.process_count(), what)
            _flush_logs()
            if me == 0:
                # Process 0 hosts the coordination service. Leaving at once can take it down while the failed
                # process is still between its announcement and its exit; that process's JAX client then
                # aborts (SIGABRT, seen on a loaded CI machine) instead of exiting 1 with its own message.
                time.sleep(2.0)
            os._exit(1)

    thread = threading.Thread(target=watch, name="flamingo-failure-watch", daemon=True)
    thread.start()

    def stop_watch() -> None:
        _stopping.set()
        thread.join(timeout=2 * _WATCH_POLL_MS / 1000)

    # atexit runs in reverse order of registration: this runs before JAX's own shutdown (registered at
    # initialize), while the key-value store still answers.
    atexit.register(stop_watch)


def _multi_process() -> bool:
    # JAX's own record of the join: asking jax.process_count() instead would start a backend.
    from jax._src import distributed as _dist

    return _dist.global_state.client is not None and (_dist.global_state.num_processes or 1) > 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _flush_logs() -> None:
    for h in py_logging.getLogger().handlers + logging.get_absl_logger().handlers:
        h.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def topology(mesh: jax.sharding.Mesh) -> str:
    """Processes, local and global devices, and how the mesh lays out over processes, as log lines."""
    devices = jax.devices()
    local = jax.local_devices()
    kinds = sorted({d.device_kind for d in devices})
    proc_grid = np.vectorize(lambda d: d.process_index)(mesh.devices)
    lines = [
        f"process {jax.process_index()} of {jax.process_count()}; {jax.default_backend()} ({', '.join(kinds)})",
        f"local devices {len(local)}: ids {[d.id for d in local]}",
        f"global devices {len(devices)} over {jax.process_count()} processes",
        f"mesh {dict(mesh.shape)}",
    ]
    for axis, name in enumerate(mesh.axis_names):
        # An axis spans several processes when moving along it changes process: its collectives leave the host.
        spans = int(np.max(np.apply_along_axis(lambda v: len(set(v.tolist())), axis, proc_grid)))
        lines.append(f"mesh axis {name!r} size {mesh.shape[name]} spans {spans} process(es)")
    return "\n".join(lines)


def log_topology(mesh: jax.sharding.Mesh) -> str:
    text = topology(mesh)
    for line in text.splitlines():
        logging.info("topology: %s", line)
    return text


def describe_env(env: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The environment variables `plan` reads that are set, for error messages and dry runs."""
    env = os.environ if env is None else env
    keys = _ENV_KEYS
    return {k: str(env[k]) for k in keys if k in env}
