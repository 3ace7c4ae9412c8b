"""Will this config fit that pod? Compile the real steps ahead of time for a target and read XLA's memory plan.

    python -m flamingo_jax.tools.plan --config=configs/flamingo_80b.py --topology=v4-3072
    python -m flamingo_jax.tools.plan --config=configs/flamingo_3b.py --topology=v4:2x2x4 --mesh=1,16,1 --json

The train step (every dataset, accumulation, micro-batches, donation: `train.compile_steps`, the trainer's own)
and the eval step are lowered against sharded shapes (`train.abstract_state`, `train.abstract_batches`) on the
target's devices and compiled by the target's compiler; nothing is allocated. TPU targets need libtpu
(`pip install -e ".[tpu]"`), which compiles for any slice on any machine; GPU clusters are compiled for a TPU
slice with as many chips and held against the GPU's memory, labelled a proxy (see `flamingo_jax.topology`).

The report gives, per chip: trainable parameters, optimiser state, frozen weights, the batch, XLA's temporaries,
and the total against HBM less `--headroom`; XLA's FLOPs per step beside the analytic model FLOPs
(`flamingo_jax.flops`; XLA's cost analysis counts the body of a scanned layer stack once, so its figure is for
comparing settings, such as how the frozen encoder's work spreads over chips, not for MFU); compile time; the
meshes that both divide the model and map onto the topology. When the config does not fit, it compiles candidate
settings (mesh, remat, micro-batches) from the cheapest in step time up, skipping those that a memory model
fitted to the first compile says cannot fit, at most `--max_compiles`, and prints the first that fits as
command-line overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from flamingo_jax import config as config_lib
from flamingo_jax import config_flags, sharding, topology, train
from flamingo_jax.metrics import quiet_library_logs
from flamingo_jax.models import flamingo

_CONFIG = config_flags.define_config_flag()
_TOPOLOGY = flags.DEFINE_string("topology", None, "Target: v4:8x12x16, v4-3072, v5p-256, h100:64, cpu:8, local.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh (data,fsdp,tensor), e.g. 12,8,16; default: config.mesh.")
_HBM = flags.DEFINE_float("hbm_gib", None, "Memory per chip in GiB; default: the target's.")
_HEADROOM = flags.DEFINE_float("headroom", 0.1, "Fraction of HBM kept free: fits means total <= (1 - this) * HBM.")
_SEARCH = flags.DEFINE_bool("search", True, "When the config does not fit, look for settings that do.")
_MAX_COMPILES = flags.DEFINE_integer(
    "max_compiles", 4, "Compiles the search may spend after the config's own (each is minutes at scale)."
)
_EVAL = flags.DEFINE_bool("eval", True, "Also compile the eval step (once, for the setting reported).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of tables.")

# Recomputation, cheapest first: `dots` keeps every matmul output, `dots_no_batch` not the batched (attention) ones.
REMAT_COST = {"none": 0, "dots": 1, "dots_no_batch": 2, "full": 3}
MICRO_FACTORS = (1, 2, 4, 8)
# XLA:TPU's out-of-memory compile errors: "Used 45.0G of 30.75G hbm" (the total) or "temporaries 38.9G exceed".
_OOM_TOTAL = re.compile(r"Used ([\d.]+)([TGMK])i?B? of", re.I)
_OOM_TEMP = re.compile(r"temporar\w* ([\d.]+)([TGMK])i?B? exceed", re.I)


# ---------------------------------------------------------------------------------------------------------------
# Settings: the knobs the search turns, as the overrides a user would pass.
@dataclasses.dataclass(frozen=True)
class Setting:
    mesh: tuple[int, int, int]
    remat: str
    micro: tuple[tuple[str, int], ...]  # (dataset, micro_batches)

    def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict(config.to_dict())
        c.mesh = self.mesh
        c.model.remat = self.remat
        for name, k in self.micro:
            c.data.datasets[name].micro_batches = k
        return c

    def overrides(self) -> list[str]:
        out = [f"--config.mesh='({','.join(map(str, self.mesh))})'", f"--config.model.remat={self.remat}"]
        return out + [f"--config.data.datasets.{n}.micro_batches={k}" for n, k in self.micro]

    def cost(self) -> tuple:
        """Sort key, cheapest step first: tensor parallelism talks every layer, remat recomputes, micro-batches
        shrink the matmuls, FSDP gathers weights once per micro-batch."""
        micro = max((k for _, k in self.micro), default=1)
        return (self.mesh[2], REMAT_COST.get(self.remat, 9), micro, self.mesh[1])


def setting_of(config: ml_collections.ConfigDict, mesh: tuple[int, int, int]) -> Setting:
    micro = tuple((n, int(ds.get("micro_batches", 1))) for n, ds in config.data.datasets.items())
    return Setting(tuple(mesh), str(config.model.remat), micro)


# ---------------------------------------------------------------------------------------------------------------
# Meshes that divide the model and map onto the devices.
@functools.lru_cache(maxsize=4)
def abstract_params(mcfg: train.ModelConfig) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: train.create_model(mcfg, nnx.Rngs(0))), nnx.Param)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_mesh(spec: Sequence[int], chips: int) -> tuple[int, int, int]:
    shape = [int(s) for s in spec]
    if shape.count(-1) == 1:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = chips // known if chips % known == 0 else -1
    return tuple(shape)


def mesh_problem(
    config: ml_collections.ConfigDict,
    mcfg: flamingo.FlamingoConfig,
    shape: tuple[int, int, int],
    devices: list,
    physical: bool = True,
) -> str | None:
    """Why this mesh cannot run the config on these devices, or None."""
    if math.prod(shape) != len(devices) or min(shape) < 1:
        return f"mesh {shape} does not cover {len(devices)} devices"
    try:
        config_lib.validate_mesh(config, mcfg, dict(zip(sharding.MESH_AXES, shape)))
    except ValueError as e:
        return str(e)
    try:
        mesh = sharding.make_mesh(shape, devices, physical=physical)
    except Exception as e:  # jax's physical-layout errors are plain ValueErrors/NotImplementedErrors
        return f"mesh {shape} does not map onto the topology: {e}"
    try:
        sharding.state_shardings(abstract_params(mcfg), mesh, sharding.rules_from_config(config.sharding.rules))
    except sharding.ShardingError as e:
        return str(e)
    return None


def propose_meshes(
    config: ml_collections.ConfigDict, mcfg: flamingo.FlamingoConfig, devices: list, physical: bool = True
) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) mesh that divides the model and the batches and maps onto the devices,
    cheapest in communication first (least tensor, then least fsdp)."""
    n, out = len(devices), []
    for t in _divisors(n):
        for f in _divisors(n // t):
            shape = (n // t // f, f, t)
            if mesh_problem(config, mcfg, shape, devices, physical) is None:
                out.append(shape)
    return sorted(out, key=lambda s: (s[2], s[1]))


# ---------------------------------------------------------------------------------------------------------------
# One compile.
def _bytes_per_chip(tree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _gib(x: float) -> float:
    return round(x / topology.GIB, 6)


def _memory(compiled: Any) -> dict[str, float]:
    ma = compiled.memory_analysis()
    mem = {k: getattr(ma, f"{k}_size_in_bytes", 0) for k in ("argument", "output", "alias", "temp")}
    mem["code"] = getattr(ma, "generated_code_size_in_bytes", 0)
    mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["code"]
    return mem


def _flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _out_of_memory(error: Exception) -> dict[str, Any] | None:
    """{'message', 'total' or 'temp' (bytes, when the message says)} for XLA's out-of-memory compile error
    (TPU), or None for any other error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    unit = {"T": 2**40, "G": 2**30, "M": 2**20, "K": 2**10}
    out: dict[str, Any] = {"message": text.strip().splitlines()[0][:300]}
    for key, pattern in (("total", _OOM_TOTAL), ("temp", _OOM_TEMP)):
        if m := pattern.search(text):
            out[key] = float(m[1]) * unit[m[2].upper()]
    return out


def compile_setting(
    config: ml_collections.ConfigDict, devices: list, target: topology.Target, headroom: float, *, eval_step: bool
) -> dict[str, Any]:
    """Compile the train step (and optionally the eval step) of `config` on `devices`; the per-chip report."""
    mcfg = train.validate(config)
    mesh = sharding.make_mesh(config.mesh, devices, physical=not target.proxy_for)
    config_lib.validate_mesh(config, mcfg, dict(mesh.shape))
    tr = train.build(config, mcfg, mesh)
    state, frozen = train.abstract_state(tr)
    batches = train.abstract_batches(tr)
    steps, evaluate = train.compile_steps(tr)
    budget = (1 - headroom) * target.hbm_gib * topology.GIB
    report: dict[str, Any] = dict(
        mesh=list(mesh.shape.values()),
        remat=mcfg.remat,
        micro_batches={m: int(config.data.datasets[m].get("micro_batches", 1)) for m in tr.names},
        params_gib=_gib(_bytes_per_chip(state["params"])),
        opt_state_gib=_gib(_bytes_per_chip(state["opt_state"])),
        frozen_gib=_gib(_bytes_per_chip(frozen)),
        batch_gib=_gib(_bytes_per_chip(batches)),
    )
    # round_robin feeds one dataset per step: one program per dataset; the others feed all datasets at once.
    feeds = [[m] for m in tr.names] if config.train.strategy == "round_robin" else [tr.names]
    t0 = time.perf_counter()
    worst, flops_per_chip = None, 0.0
    with sharding.use_mesh_rules(tr.mesh, tr.rules):
        for names in feeds:
            try:
                compiled = (
                    steps[names[0] if len(feeds) > 1 else "all"]
                    .lower(state, frozen, {m: batches[m] for m in names})
                    .compile()
                )
            except Exception as e:  # XLA raises its own error type; only out-of-memory is a result
                oom = _out_of_memory(e)
                if oom is None:
                    raise
                args = report["params_gib"] + report["opt_state_gib"] + report["frozen_gib"] + report["batch_gib"]
                temp = oom.get("temp", oom["total"] - args * topology.GIB if "total" in oom else math.nan)
                total = None if math.isnan(temp) else round(args + _gib(temp), 3)
                # A GPU proxy's TPU may hold less than the GPU (v5p 95 GiB, H200 140): its limit is not the GPU's.
                proxy_fits = bool(target.proxy_for) and total is not None and total * topology.GIB <= budget
                report.update(
                    fits=proxy_fits,
                    error=oom["message"],
                    temp_gib=None if math.isnan(temp) else _gib(temp),
                    total_gib=total,
                    compile_s=round(time.perf_counter() - t0, 1),
                )
                return report
            mem = _memory(compiled)
            flops_per_chip += _flops(compiled) / len(feeds)
            if worst is None or mem["total"] > worst["total"]:
                worst = mem
    report["compile_s"] = round(time.perf_counter() - t0, 1)
    report |= {f"{k}_gib": _gib(v) for k, v in worst.items()}
    report["xla_flops_per_chip"] = flops_per_chip
    report["xla_flops"] = flops_per_chip * len(devices)
    shapes = {m: {k: v.shape for k, v in b.items()} for m, b in batches.items()}
    report["model_flops"] = train.step_flops(tr, shapes) / len(feeds)
    report["fits"] = worst["total"] <= budget
    if eval_step:
        report["eval"] = compile_eval(tr, evaluate, state, frozen, budget)
        report["fits"] = report["fits"] and report["eval"]["fits"]
    return report


def compile_eval(tr: train.Trainer, evaluate: Any, state: dict, frozen: Any, budget: float) -> dict[str, Any]:
    """The eval step for each distinct evaluation batch shape; the largest."""
    batches = train.abstract_batches(tr, train=False)
    seen, worst = set(), None
    t0 = time.perf_counter()
    with sharding.use_mesh_rules(tr.mesh, tr.rules):
        for b in batches.values():
            key = tuple((k, v.shape) for k, v in sorted(b.items()))
            if key in seen:
                continue
            seen.add(key)
            try:
                mem = _memory(evaluate.lower(state["params"], frozen, b).compile())
            except Exception as e:
                oom = _out_of_memory(e)
                if oom is None:
                    raise
                return dict(fits=False, error=oom["message"], compile_s=round(time.perf_counter() - t0, 1))
            if worst is None or mem["total"] > worst["total"]:
                worst = mem
    return dict(
        fits=worst["total"] <= budget,
        total_gib=_gib(worst["total"]),
        temp_gib=_gib(worst["temp"]),
        compile_s=round(time.perf_counter() - t0, 1),
    )


# ---------------------------------------------------------------------------------------------------------------
# The search: settings from the cheapest step up; those that a memory model fitted to the first compile says
# cannot fit are skipped, so that the compiles (minutes each at scale) go to plausible settings.
# Activation memory kept for the backward pass per remat policy, relative to none: rough, for skipping only.
REMAT_ACTIVATIONS = {"none": 1.0, "dots": 0.7, "dots_no_batch": 0.6, "full": 0.25}


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Per-chip sizes of a setting that follow from its shardings alone, without compiling."""

    weights: float  # bytes: trainable parameters + Adam's two moments + frozen weights
    grads: float  # bytes: float32 gradients of the trainable parameters (XLA temporaries)
    rows: float  # examples per chip in one micro-batch, summed over datasets
    tensor: int


def weights_per_chip(
    config: ml_collections.ConfigDict,
    mcfg: flamingo.FlamingoConfig,
    shape: tuple[int, int, int],
    devices: list,
    physical: bool = True,
) -> tuple[float, float]:
    """(weights + Adam's moments, float32 gradients) in bytes per chip under mesh `shape`, from shardings."""
    mesh = sharding.make_mesh(shape, devices, physical=physical)
    params = abstract_params(mcfg)
    shardings = sharding.state_shardings(params, mesh, sharding.rules_from_config(config.sharding.rules))
    flat_sh = dict(nnx.to_flat_state(shardings))
    is_trainable = flamingo.trainable_filter(mcfg.trainable)
    weights = grads = 0.0
    for path, var in nnx.to_flat_state(params):
        n = math.prod(flat_sh[path].get_value().shard_shape(var.shape))
        if is_trainable(path, var):
            weights += 3 * n * np.dtype(mcfg.param_dtype).itemsize
            grads += n * 4
        else:
            weights += n * np.dtype(mcfg.frozen_param_dtype).itemsize
    return weights, grads


def footprint(
    config: ml_collections.ConfigDict,
    setting: Setting,
    weights: Callable[[tuple[int, int, int]], tuple[float, float]],
) -> Footprint:
    """`weights`: mesh shape -> `weights_per_chip` (memoised by the caller: it depends on the mesh alone)."""
    w, g = weights(setting.mesh)
    rules = sharding.rules_from_config(config.sharding.rules)
    shards = sharding.axis_size(rules, dict(zip(sharding.MESH_AXES, setting.mesh)), "batch")
    micro = dict(setting.micro)
    rows = sum(ds.batch_size / micro.get(n, 1) / shards for n, ds in config.data.datasets.items())
    return Footprint(w, g, rows, setting.mesh[2])


def predicted_total(ref: dict[str, Any], ref_fp: Footprint, ref_remat: str, fp: Footprint, remat: str) -> float:
    """A setting's bytes per chip from a compiled reference: weights and gradients from shardings, activations
    scaled by rows per chip, remat policy and (half of them, the Megatron-sharded part) tensor parallelism."""
    activations = max(ref["temp_gib"] * topology.GIB - ref_fp.grads, 0.0)
    activations *= fp.rows / ref_fp.rows * REMAT_ACTIVATIONS.get(remat, 1) / REMAT_ACTIVATIONS.get(ref_remat, 1)
    activations *= 0.5 + 0.5 * ref_fp.tensor / fp.tensor
    return fp.weights + fp.grads + activations


def candidates(config: ml_collections.ConfigDict, meshes: Sequence[tuple[int, int, int]]) -> list[Setting]:
    """Meshes x remat policies (the config's and every one that recomputes more) x micro-batches (x1, 2, 4, 8
    where the batch shards divide them), cheapest step first."""
    rules = sharding.rules_from_config(config.sharding.rules)
    base_micro = {n: int(ds.get("micro_batches", 1)) for n, ds in config.data.datasets.items()}
    out = []
    for shape in meshes:
        shards = sharding.axis_size(rules, dict(zip(sharding.MESH_AXES, shape)), "batch")
        own = REMAT_COST.get(str(config.model.remat), 0)
        for remat in [str(config.model.remat)] + [r for r, c in REMAT_COST.items() if c > own]:
            for factor in MICRO_FACTORS:
                micro = {n: base_micro[n] * factor for n in base_micro}
                if all(
                    ds.batch_size % micro[n] == 0 and (ds.batch_size // micro[n]) % shards == 0
                    for n, ds in config.data.datasets.items()
                ):
                    out.append(Setting(shape, remat, tuple(micro.items())))
    return sorted(out, key=Setting.cost)


def plan(
    config: ml_collections.ConfigDict,
    target: topology.Target,
    *,
    headroom: float = 0.1,
    search: bool = True,
    max_compiles: int = 4,
    eval_step: bool = True,
) -> dict[str, Any]:
    """The report as a dict (see `--json`)."""
    devices = target.devices()
    mcfg = train.validate(config)
    mesh = resolve_mesh(config.mesh, len(devices))
    proposals = propose_meshes(config, mcfg, devices, physical=not target.proxy_for)
    # Every key of the report exists, null where unknown (the config's own mesh is invalid, or XLA ran out of memory).
    result: dict[str, Any] = dict.fromkeys(("total_gib", "temp_gib", "compile_s", "xla_flops", "model_flops"))
    result |= dict(
        target=target.label,
        chips=len(devices),
        hbm_gib=round(target.hbm_gib, 2),
        headroom=headroom,
        proxy=bool(target.proxy_for),
        mesh=list(mesh),
        proposed_meshes=[list(p) for p in proposals],
    )
    tried: list[dict[str, Any]] = []

    def attempt(setting: Setting, with_eval: bool) -> dict[str, Any]:
        logging.info("compiling %s", " ".join(setting.overrides()))
        r = compile_setting(setting.apply(config), devices, target, headroom, eval_step=with_eval)
        tried.append(
            dict(overrides=setting.overrides(), fits=r["fits"], total_gib=r.get("total_gib"), compile_s=r["compile_s"])
        )
        return r

    first = setting_of(config, mesh)
    problem = mesh_problem(config, mcfg, mesh, devices, physical=not target.proxy_for)
    if problem is None:
        report = attempt(first, eval_step)
    else:
        report = dict(fits=False, error=problem, mesh=list(mesh))
    result |= report
    result["suggestion"] = None
    if not report["fits"] and search:
        budget = (1 - headroom) * target.hbm_gib * topology.GIB
        physical = not target.proxy_for
        weights = functools.lru_cache(maxsize=None)(
            lambda shape: weights_per_chip(config, mcfg, shape, devices, physical)
        )
        ref_fp = footprint(config, first, weights) if problem is None else None
        usable_ref = ref_fp is not None and report.get("temp_gib") is not None
        skipped, compiles = 0, 0
        result["search"] = "no candidate setting fits"
        for setting in candidates(config, proposals):
            if setting == first:
                continue
            fp = footprint(config, setting, weights)
            # Skip only clear misfits: the weights alone, or a prediction 20% over (the model is rough).
            if fp.weights + fp.grads > budget or (
                usable_ref and predicted_total(report, ref_fp, first.remat, fp, setting.remat) > 1.2 * budget
            ):
                skipped += 1
                continue
            if compiles >= max_compiles:
                result["search"] = f"stopped after {compiles} compiles (--max_compiles)"
                break
            compiles += 1
            r = attempt(setting, eval_step)
            if r["fits"]:
                result["suggestion"] = setting.overrides()
                result["suggested"] = r
                result["search"] = "found"
                break
        result["skipped_as_predicted_misfits"] = skipped
    result["tried"] = tried
    return result


# ---------------------------------------------------------------------------------------------------------------
# Output.
def _row(r: dict[str, Any]) -> list[str]:
    keys = ("params_gib", "opt_state_gib", "frozen_gib", "batch_gib", "temp_gib", "total_gib")
    return [f"{r[k]:.2f}" if isinstance(r.get(k), float | int) else "-" for k in keys]


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"target: {result['target']}, {result['chips']} chips, {result['hbm_gib']} GiB each, "
        f"fits means total <= {1 - result['headroom']:.0%} of that"
    ]
    head = ["setting", "params", "opt", "frozen", "batch", "temp", "total", "fits", "compile s"]

    def describe(r: dict[str, Any]) -> str:
        micro = r.get("micro_batches") or {}
        m = f" micro {max(micro.values())}" if micro and max(micro.values()) > 1 else ""
        return f"mesh {tuple(r['mesh'])} remat {r.get('remat', '?')}{m}"

    rows = [[describe(result), *_row(result), str(result["fits"]), str(result.get("compile_s", "-"))]]
    if result.get("suggested"):
        s = result["suggested"]
        rows.append([describe(s), *_row(s), str(s["fits"]), str(s.get("compile_s", "-"))])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines += [fmt.format(*head)] + [fmt.format(*r) for r in rows]
    lines.append("(GiB per chip: trainable params, optimiser state, frozen weights, batch, XLA temporaries, total)")
    if "error" in result:
        lines.append(f"config as given: {result['error']}")
    if result.get("xla_flops"):
        lines.append(
            f"FLOPs per step: XLA {result['xla_flops_per_chip']:.3e} per chip, {result['xla_flops']:.3e} for the "
            f"pod; model {result['model_flops']:.3e}. XLA counts a scanned layer stack's body once (and adds remat and "
            "elementwise work): compare XLA's figures between settings, the model's with MFU"
        )
    if "eval" in result:
        e = result["eval"]
        lines.append(
            f"eval step: total {e.get('total_gib', '-')} GiB, fits {e['fits']}, compiled in {e['compile_s']} s"
        )
    props = result["proposed_meshes"]
    lines.append(
        f"meshes that divide the model and map onto the topology ({len(props)}): "
        + ", ".join(str(tuple(p)) for p in props[:12])
        + (" ..." if len(props) > 12 else "")
    )
    if result["suggestion"]:
        lines.append("fits with: " + " ".join(result["suggestion"]))
    elif not result["fits"]:
        lines.append(f"no fitting setting found ({result.get('search', 'search disabled')})")
    if result["proxy"]:
        lines.append(
            "proxy: compiled by the TPU compiler; XLA:GPU's buffers differ. Check on one real node with "
            "--topology=local."
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    if not _TOPOLOGY.value:
        raise app.UsageError("--topology is required, e.g. --topology=v4:2x2x2")
    if m := re.fullmatch(r"cpu:(\d+)", _TOPOLOGY.value.strip().lower()):
        jax.config.update("jax_num_cpu_devices", int(m[1]))  # before anything starts the CPU backend
    config = config_flags.get(_CONFIG)
    if _MESH.value:
        config.mesh = tuple(int(x) for x in _MESH.value.strip("()").split(","))
    target = topology.parse(_TOPOLOGY.value, _HBM.value)
    result = plan(
        config,
        target,
        headroom=_HEADROOM.value,
        search=_SEARCH.value,
        max_compiles=_MAX_COMPILES.value,
        eval_step=_EVAL.value,
    )
    print(json.dumps(result) if _JSON.value else format_table(result))


if __name__ == "__main__":
    app.run(main)
