"""The benchmark scripts run and print sane rows (tiny shapes, CPU), so they do not rot between GPU sessions."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    return out.stdout


def test_attention_benchmark_rows_are_finite_and_close_to_the_reference():
    out = _run("attention.py", "--batch=2", "--lm_len=32", "--heads=2", "--head_dim=16", "--n_media=2",
               "--latents=4", "--grid=9", "--iters=1")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {r["site"] for r in rows} == {"lm_self_attention", "media_cross_attention", "resampler"}
    for r in rows:
        assert r["impl"] == "xla" and r["finite"]
        # bfloat16 against the float32 reference: about 2^-8 relative, never more than a few percent.
        assert all(0 < r[f"max_rel_err_{n}"] < 0.05 for n in ("out", "dq", "dk", "dv")), r


def test_vision_encoder_benchmark_reports_the_grid_and_flops():
    out = _run("vision_encoder.py", "--variant=F0", "--image_size=64", "--batch=2", "--iters=1", "--dtype=float32")
    result = json.loads(out[out.index("{"):])
    assert result["grid"] == [2, 2, 1536]
    assert result["tflops_per_forward"] > 0 and result["forward_s"] > 0
