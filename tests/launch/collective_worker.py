"""A minimal multi-process JAX program for failure tests: joins through flamingo_jax.distributed (its flags),
then all-reduces over the global CPU mesh in a loop. `--fail=kill` makes process 1 SIGKILL itself and
`--fail=raise` makes it raise, at iteration 5; the others are then blocked in the next collective."""

import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from flamingo_jax import distributed

_FAIL = flags.DEFINE_enum("fail", "none", ["none", "kill", "raise"], "How process 1 fails.")
_ITERS = flags.DEFINE_integer("iters", 400, "All-reduces to run.")


def work() -> None:
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    total = jax.jit(jnp.sum)
    n = jax.local_device_count()
    for i in range(_ITERS.value):
        x = jax.make_array_from_process_local_data(sh, np.full((n, 4), i, np.float32), (jax.device_count(), 4))
        print(f"iteration {i} sum {float(total(x))}", flush=True)
        if jax.process_index() == 1 and i == 5:
            if _FAIL.value == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if _FAIL.value == "raise":
                raise RuntimeError("failing on purpose")
        time.sleep(0.02)


def main(argv: list[str]) -> None:
    del argv
    distributed.initialize(distributed.options_from_flags())
    distributed.run_or_die(work)


if __name__ == "__main__":
    sys.exit(app.run(main))
