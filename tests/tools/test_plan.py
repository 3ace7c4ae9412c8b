"""The ahead-of-time planner on a tiny config: compiled for a TPU v4 slice by libtpu's compiler on this CPU
machine (the `tpu` extra), or for 8 fake CPU devices where libtpu is missing."""

import ast
import importlib.util
import json
import subprocess
import sys

import ml_collections
import pytest

from flamingo_jax import topology
from flamingo_jax.tools import plan
from tests.configs import tiny_train_config
from tests.launch import helpers

pytestmark = pytest.mark.slow

HAVE_TPU_COMPILER = importlib.util.find_spec("libtpu") is not None
TOPOLOGY = "v4:2x2x1" if HAVE_TPU_COMPILER else "cpu:8"


def one_dataset_config(batch: int = 8):
    c = tiny_train_config()
    c.data.datasets = {"ltip": c.data.datasets.ltip}
    c.data.datasets.ltip.batch_size = batch
    return c


def apply_overrides(config, overrides: list[str]):
    """The printed `--config.a.b=value` strings applied as a shell and the config flag would (quotes removed,
    values parsed as Python literals where they are ones)."""
    c = ml_collections.ConfigDict(config.to_dict())
    for override in overrides:
        key, value = override.replace("'", "").removeprefix("--config.").split("=", 1)
        *path, last = key.split(".")
        node = c
        for part in path:
            node = node[part]
        try:
            node[last] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[last] = value
    return c


def target(hbm_gib: float | None = None) -> topology.Target:
    return topology.parse(TOPOLOGY, hbm_gib or (None if HAVE_TPU_COMPILER else 16.0))


def test_cli_reports_a_fit_as_json():
    cmd = [
        sys.executable,
        "-m",
        "flamingo_jax.tools.plan",
        "--config=tests/tools/plan_config.py",
        f"--topology={TOPOLOGY}",
        "--json",
        "--hbm_gib=4",
    ]
    r = subprocess.run(cmd, cwd=helpers.REPO, env=helpers.env(8), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["fits"] is True and result["suggestion"] is None
    chips = 4 if HAVE_TPU_COMPILER else 8
    assert result["chips"] == chips and result["hbm_gib"] == 4
    assert result["mesh"] == [chips, 1, 1]  # config.mesh (-1, 1, 1) resolved
    assert 0 < result["total_gib"] < 0.9 * 4 and result["compile_s"] > 0
    parts = sum(result[k] for k in ("params_gib", "opt_state_gib", "frozen_gib", "batch_gib"))
    assert parts <= result["argument_gib"] + 1e-3  # the arguments hold at least the state and the batch
    # XLA counts a scanned layer stack's body once, so its FLOPs are not comparable with the model's; both exist.
    assert result["xla_flops"] > 0 and result["model_flops"] > 0
    assert result["xla_flops"] == pytest.approx(result["xla_flops_per_chip"] * chips)
    assert result["eval"]["fits"] is True
    assert [chips, 1, 1] in result["proposed_meshes"] and [1, 1, chips] not in result["proposed_meshes"]  # heads=2


def test_misfit_gets_a_suggestion_that_the_tool_confirms():
    c = one_dataset_config(batch=512)  # activations, not code, dominate its memory
    measured = plan.plan(c, target(), search=False, eval_step=False)
    assert measured["fits"]
    # A chip with 30% less memory than the config needs, headroom included.
    hbm = measured["total_gib"] * 0.7 / 0.9
    result = plan.plan(c, target(hbm), search=True, max_compiles=8, eval_step=False)
    assert result["fits"] is False and result["total_gib"] > 0.9 * hbm
    assert result["suggestion"], (result["search"], result["tried"])
    suggested = result["suggested"]
    assert suggested["fits"] and suggested["total_gib"] <= 0.9 * hbm

    # Apply the printed overrides as a user would (through the config flags), and plan again.
    confirmed = apply_overrides(c, result["suggestion"])
    assert tuple(confirmed.mesh) == tuple(suggested["mesh"])
    again = plan.plan(confirmed, target(hbm), search=False, eval_step=False)
    assert again["fits"] and again["total_gib"] == pytest.approx(suggested["total_gib"])
    print("misfit", result["total_gib"], "GiB; suggestion", result["suggestion"], suggested["total_gib"], "GiB")


def test_meshes_must_divide_the_model_and_the_batch():
    c = one_dataset_config(batch=8)
    mcfg = plan.train.validate(c)
    devices = target().devices()
    meshes = plan.propose_meshes(c, mcfg, devices)
    assert meshes and all(m[0] * m[1] * m[2] == len(devices) for m in meshes)
    assert all(m[2] <= 2 for m in meshes)  # 2 heads: no 4-way tensor parallelism
    problem = plan.mesh_problem(c, mcfg, (len(devices) // 4, 1, 4), devices)
    assert problem is not None and "config.model.lm.num_heads=2" in problem


def test_out_of_memory_compile_errors_are_results():
    msg = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
        "Used 45.01G of 30.75G hbm. Exceeded hbm capacity by 14.26G."
    )
    oom = plan._out_of_memory(RuntimeError(msg))
    assert oom["total"] == pytest.approx(45.01 * 2**30) and "Ran out of memory" in oom["message"]
    oom = plan._out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: HLO temporaries 38.94G exceed 30.75G"))
    assert oom["temp"] == pytest.approx(38.94 * 2**30)
    assert plan._out_of_memory(RuntimeError("INVALID_ARGUMENT: shapes")) is None
