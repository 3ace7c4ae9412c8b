#!/usr/bin/env python3
"""Run a multi-process JAX job on this machine: N processes with M fake CPU devices each.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- --config=configs/demo.py --workdir=DIR

Each process runs `python -m flamingo_jax.train` (or --module) with the arguments after `--`, plus
`--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I`; process 0 hosts the coordinator and
the processes talk over gloo (JAX's CPU collectives). This is how multi-host code is exercised without a pod:
the same trainer, the same `jax.distributed` runtime, the same per-host data sharding.

Output is streamed line by line with a `[I]` prefix per process. When a process exits non-zero, the others are
sent SIGTERM, then SIGKILL after --kill_grace seconds, and this launcher exits with the failed process's code
(128 + signal for a signal). Ctrl-C stops all of them. --dry_run prints the commands and environment instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=4)
    p.add_argument("--module", default="flamingo_jax.train", help="Python module each process runs (-m).")
    p.add_argument("--port", type=int, default=0, help="Coordinator port; 0 picks a free one.")
    p.add_argument("--kill_grace", type=float, default=10.0, help="Seconds between SIGTERM and SIGKILL.")
    p.add_argument("--log_dir", default=None, help="Also write each process's output to LOG_DIR/process_I.log.")
    p.add_argument("--dry_run", action="store_true", help="Print what would run, run nothing.")
    return p.parse_args(argv), passthrough


def free_port() -> int:
    # Another program may take it before process 0 binds; good enough on a development machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one process: CPU only, `devices` fake devices, unbuffered output, the repo importable."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    return env


def commands(num_processes: int, port: int, module: str, passthrough: Sequence[str]) -> list[list[str]]:
    """One command line per process. A single process gets no distributed flags: it is a plain local run."""
    base = [sys.executable, "-m", module]
    if num_processes == 1:
        return [[*base, *passthrough]]
    dist = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}"]
    return [[*base, *dist, f"--process_id={i}", *passthrough] for i in range(num_processes)]


class Job:
    """The running processes, their output pumps, and the stop-everything logic."""

    def __init__(self, cmds: list[list[str]], env: dict[str, str], log_dir: str | None, kill_grace: float):
        self.kill_grace = kill_grace
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        self.logs: list[IO[str] | None] = []
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
        for i, cmd in enumerate(cmds):
            log = open(os.path.join(log_dir, f"process_{i}.log"), "w") if log_dir else None  # noqa: SIM115
            # Own session: a signal reaches the process's children too (Grain workers), and a Ctrl-C in this
            # terminal reaches only us, so we decide the order of shutdown.
            proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
            pump = threading.Thread(target=self._pump, args=(i, proc.stdout, log), daemon=True)
            pump.start()
            self.procs.append(proc)
            self.pumps.append(pump)
            self.logs.append(log)

    def _pump(self, i: int, stream: IO[str], log: IO[str] | None) -> None:
        for line in stream:
            with self.lock:
                sys.stdout.write(f"[{i}] {line}")
                sys.stdout.flush()
                if log is not None:
                    log.write(line)
                    log.flush()

    def say(self, message: str) -> None:
        with self.lock:
            sys.stdout.write(f"[local] {message}\n")
            sys.stdout.flush()

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # exited since poll()
                    os.killpg(proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM to every live process group, SIGKILL to what is left after the grace period."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        if any(p.poll() is None for p in self.procs):
            self.say(f"still running after {self.kill_grace:g} s: SIGKILL")
            self._signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self) -> int:
        """Blocks until all exit 0 (returns 0) or one fails (stops the rest, returns its exit status)."""
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    i, code = failed[0]
                    why = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
                    self.say(f"process {i} exited with {why}; stopping the others")
                    self.stop()
                    return 128 - code if code < 0 else code
                if all(c == 0 for c in codes):
                    return 0
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.say("interrupted; stopping all processes")
            self.stop()
            return 130
        finally:
            for t in self.pumps:
                t.join(timeout=5)
            for log in self.logs:
                if log is not None:
                    log.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str]) -> int:
    args, passthrough = parse_args(argv)
    if args.num_processes < 1 or args.devices_per_process < 1:
        print("--num_processes and --devices_per_process must be >= 1", file=sys.stderr)
        return 2
    port = args.port or free_port()
    cmds = commands(args.num_processes, port, args.module, passthrough)
    env = child_env(args.devices_per_process)
    if args.dry_run:
        shown = {k: env[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "PYTHONPATH")}
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items())
        for i, cmd in enumerate(cmds):
            print(f"[{i}] cd {shlex.quote(REPO)} && {prefix} {shlex.join(cmd)}")
        return 0
    job = Job(cmds, env, args.log_dir, args.kill_grace)
    signal.signal(signal.SIGTERM, _interrupt)  # a batch system stopping the launcher stops the job, like Ctrl-C
    job.say(f"{args.num_processes} process(es) x {args.devices_per_process} CPU device(s), coordinator port {port}")
    code = job.wait()
    job.say(f"exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
