"""Target hardware for ahead-of-time compilation: TPU slices by name, GPU clusters by proxy, local devices.

libtpu's compiler runs on any machine, CPU included (`pip install -e ".[tpu]"`): `devices()` of a TPU target are
the chips of a slice that does not exist here, good for `jax.jit(...).lower(...).compile()` and nothing else.
Names accepted by `parse`:

    v4:8x12x16, v5p:4x4x4, v5e:16x16, v6e:8x8   jax's topology names (chips per dimension)
    v4-3072, v5p-256, v5litepod-256, v6e-64     gcloud accelerator types (v4 and v5p count 2 cores per chip)
    h100:64, a100-80gb:256, h200:8              GPU clusters: compiled for a TPU v5p slice with as many chips,
                                                held against the GPU's memory (a proxy: XLA:GPU fuses differently)
    cpu:8                                       fake CPU devices (tests; memory from --hbm_gib)
    local                                       the devices this process sees (a real GPU node, say)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuKind:
    hbm_gib: float  # per chip, nominal
    dims: int  # 3: a 3-D torus (v4, v5p); 2: a 2-D one (v5e, v6e)
    cores_per_chip: int  # in gcloud's accelerator-type names
    chip_config: str  # libtpu's name for one device per chip


TPU_KINDS = {
    "v4": TpuKind(32, 3, 2, "megacore"),
    "v5p": TpuKind(95, 3, 2, "megacore"),
    "v5e": TpuKind(16, 2, 1, "default"),
    "v6e": TpuKind(32, 2, 1, "default"),
}
GCLOUD_ALIASES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
# GPU memory per device in GiB, as the devices report it (what the product calls GB, less what the driver keeps).
# JAX preallocates 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise: set it to ~0.95 on real runs.
GPU_MEMORY_GIB = {
    "a100": 39.4,
    "a100-40gb": 39.4,
    "a100-80gb": 79.2,
    "h100": 79.6,
    "h100-80gb": 79.6,
    "h200": 139.8,
}
GPU_PROXY = "v5p"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it
    platform: str  # 'tpu', 'cpu' or the local devices' platform
    chips: int
    hbm_gib: float  # per chip (device)
    topology: str = ""  # jax's topology name for a TPU target
    proxy_for: str = ""  # the GPU cluster a TPU topology stands in for

    @property
    def label(self) -> str:
        if self.proxy_for:
            return (
                f"{self.proxy_for} (proxy: TPU {self.topology} compiler, {self.hbm_gib:.1f} GiB per GPU; JAX takes "
                "75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised)"
            )
        return f"TPU {self.topology}" if self.topology else f"{self.chips} x {self.platform} ({self.name})"

    def devices(self) -> list[jax.Device]:
        if self.platform == "tpu":
            from jax.experimental import topologies

            # No metadata server here: libtpu must not wait for one. Compiling needs no chip, so several processes
            # (test workers, a second plan) may load libtpu at once: skip its one-process lock.
            os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            kind = TPU_KINDS[self.topology.split(":")[0]]
            topo = topologies.get_topology_desc(
                platform="tpu",
                topology_name=self.topology,
                chip_config_name=kind.chip_config,
                chips_per_host_bounds=(2, 2, 1),
                num_slices=1,
                wrap=(False, False, False),
            )
            return list(topo.devices)
        if self.platform == "cpu":
            devices = jax.devices("cpu")
            if len(devices) < self.chips:
                raise ValueError(
                    f"--topology={self.name}: {len(devices)} CPU devices; set "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={self.chips} before JAX starts"
                )
            return devices[: self.chips]
        return jax.devices()


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The most cube-like slice of `chips` chips (v4-3072 -> 8x12x16, v5litepod-256 -> 16x16), the shapes
    Cloud TPU provisions: every dimension even where it can be, the largest last; small slices end in 1."""
    if chips < 4 or chips % 4:
        raise ValueError(f"a TPU slice needs a multiple of 4 chips, got {chips}")
    best = None
    for ascending in _factorisations(chips, dims):
        shape = (*ascending[1:], 1) if ascending[0] == 1 else ascending
        if any(d % 2 for d in shape[:2]):  # a host holds 2x2 chips
            continue
        score = (ascending[-1] / ascending[0], -sum(d % 4 == 0 for d in shape))
        if best is None or score < best[0]:
            best = (score, shape)
    if best is None:
        raise ValueError(f"no {dims}-D TPU slice of {chips} chips")
    return best[1]


def _factorisations(n: int, dims: int) -> list[tuple[int, ...]]:
    if dims == 1:
        return [(n,)]
    out = []
    for d in range(1, n + 1):
        if n % d == 0:
            out += [(d, *rest) for rest in _factorisations(n // d, dims - 1) if rest[0] >= d]
    return out


def parse(name: str, hbm_gib: float | None = None) -> Target:
    """A `Target` from a topology name (module docstring); `hbm_gib` overrides the memory per chip."""
    text = name.strip().lower()
    if text == "local":
        devices = jax.devices()
        stats = devices[0].memory_stats() or {}
        limit = stats.get("bytes_limit", 0) / GIB
        if not (hbm_gib or limit):
            raise ValueError("--topology=local: the devices report no memory limit; pass --hbm_gib")
        return Target(name, devices[0].platform, len(devices), hbm_gib or limit)
    if m := re.fullmatch(r"cpu:(\d+)", text):
        if not hbm_gib:
            raise ValueError(f"--topology={name}: fake CPU devices have no memory size; pass --hbm_gib")
        return Target(name, "cpu", int(m[1]), hbm_gib)
    if m := re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", text):
        kind = TPU_KINDS[m[1]]
        shape = tuple(int(d) for d in m[2].split("x"))
        if len(shape) != kind.dims:
            raise ValueError(f"--topology={name}: {m[1]} slices have {kind.dims} dimensions")
        return Target(name, "tpu", math.prod(shape), hbm_gib or kind.hbm_gib, topology=text)
    if m := re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", text):
        gen = GCLOUD_ALIASES[m[1]]
        kind = TPU_KINDS[gen]
        cores = int(m[2])
        if cores % kind.cores_per_chip:
            raise ValueError(f"--topology={name}: {m[1]} counts {kind.cores_per_chip} cores per chip")
        chips = cores // kind.cores_per_chip
        topology = f"{gen}:" + "x".join(map(str, torus_shape(chips, kind.dims)))
        return Target(name, "tpu", chips, hbm_gib or kind.hbm_gib, topology=topology)
    if m := re.fullmatch(r"([a-z0-9-]+):(\d+)", text):
        if m[1] not in GPU_MEMORY_GIB:
            raise ValueError(f"--topology={name}: unknown accelerator {m[1]!r}; GPUs: {sorted(GPU_MEMORY_GIB)}")
        chips = int(m[2])
        topology = f"{GPU_PROXY}:" + "x".join(map(str, torus_shape(chips, TPU_KINDS[GPU_PROXY].dims)))
        gpu = f"{chips} x {m[1].upper()}"
        return Target(name, "tpu", chips, hbm_gib or GPU_MEMORY_GIB[m[1]], topology=topology, proxy_for=gpu)
    raise ValueError(
        f"--topology={name!r}: expected e.g. v4:8x12x16, v4-3072, v5p-256, v5litepod-256, h100:64, cpu:8 or local"
    )
