"""Analytic model FLOPs for MFU, and the peak FLOP/s they are measured against.

FLOPs are counted from the jaxpr of each component's forward pass (every dot_general and convolution, scan
bodies multiplied by their trip count), so they follow the model's actual shapes without compiling anything.
A training step then costs, per dataset batch (the MaxText convention, made frozen-aware):

    frozen vision encoder   1 x forward                 (no backward at all)
    frozen LM               2 x forward                 (forward + activation gradients, no weight gradients)
    trainable parts         3 x forward                 (forward + activation and weight gradients)

Rematerialisation is not counted: MFU measures useful model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

# bf16 dense peak per chip (vendor figures), for accelerators whose peak is not measured.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def _eqn_flops(eqn: Any) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out = eqn.outvars[0].aval.shape
        out_ch = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * math.prod(out) * math.prod(rhs) / out_ch
    return 0.0


def _sub_jaxprs(eqn: Any) -> list[tuple[Any, float]]:
    """(sub-jaxpr, multiplicity) pairs of a higher-order primitive."""
    params = eqn.params
    if eqn.primitive.name == "scan":
        return [(params["jaxpr"], float(params["length"]))]
    if eqn.primitive.name == "cond":
        # Count the most expensive branch.
        return [(max(params["branches"], key=jaxpr_flops), 1.0)]
    subs = []
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in params and params[key] is not None:
            subs.append((params[key], 1.0))
    return subs


def jaxpr_flops(jaxpr: Any) -> float:
    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        for sub, mult in _sub_jaxprs(eqn):
            total += mult * jaxpr_flops(sub)
    return total


def fn_flops(fn: Any, *args: Any) -> float:
    """Matmul/conv FLOPs of one call of `fn` on (abstract) arguments."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def measure_matmul_peak(dtype: str = "float32", n: int | None = None, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of a large jitted square matmul on the default device (the best of several timed runs).

    n defaults to 2048 on a CPU and 8192 on an accelerator, where smaller products do not fill the chip. Each
    timed run chains `reps` products so that dispatch latency does not count against a fast device.
    """
    on_cpu = jax.devices()[0].platform == "cpu"
    n = n or (2048 if on_cpu else 8192)
    reps = 1 if on_cpu else 10
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)) / math.sqrt(n), dtype)

    @jax.jit
    def f(x):
        return jax.lax.fori_loop(0, reps, lambda _, y: y @ a, x)

    f(a).block_until_ready()
    best = math.inf
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2.0 * n**3 * reps / best


def peak_flops_per_device(configured: float, dtype: str) -> tuple[float, str]:
    """(FLOP/s, where it came from): the config's value, the vendor table, or a CPU measurement."""
    if configured > 0:
        return configured, "config.train.peak_flops"
    device = jax.devices()[0]
    for kind, value in PEAK_FLOPS.items():
        if kind.lower() in device.device_kind.lower():
            return value, f"table ({device.device_kind})"
    if device.platform == "cpu":
        return measure_matmul_peak(dtype), f"measured ({dtype} matmul on {device.device_kind})"
    raise ValueError(f"no peak FLOP/s known for {device.device_kind}; set config.train.peak_flops")
