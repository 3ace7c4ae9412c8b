"""Train-step throughput: step time, tokens/s, examples/s, MFU and memory, on random in-memory batches (so the
input pipeline is excluded; `benchmarks/input_pipeline.py` measures that side).

    python benchmarks/train_step.py --preset=demo --steps=20
    python benchmarks/train_step.py --preset=cpu_large --steps=10
    python benchmarks/train_step.py --config=configs/flamingo_3b.py --config.model.attention=cudnn   # a GPU

`demo` is configs/demo.py. `cpu_large` is a larger, LM-heavy model whose step FLOPs are dominated by matrix
multiplies (frozen vision encoder, 8-layer d=512 LM, 256-token sequences), the case MFU is meaningful for.
`--config` takes any config file with `--config.a.b=value` overrides, as the trainer does. Whether a setting fits
in memory, without allocating it: `python -m flamingo_jax.tools.plan --config=... --topology=local`.

MFU is printed against two peaks: the one the trainer uses (config, vendor table, or measured on a CPU) and
the best bf16/f32 matmul this device sustains, measured here (`mfu_vs_measured_matmul`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import resource
import time

import jax
import numpy as np
from absl import app, flags

from flamingo_jax import config_flags

_CONFIG = config_flags.define_config_flag()
_PRESET = flags.DEFINE_enum("preset", "demo", ["demo", "cpu_large"], "Built-in config when --config is not given.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first compiles).")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def preset_config(name: str):
    spec = importlib.util.spec_from_file_location("demo", ROOT / "configs" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    if name == "cpu_large":
        c.model.lm = dict(family="chinchilla", vocab_size=512, num_layers=8, dim=512, num_heads=8, head_dim=64,
                          mlp_dim=2048, max_len=512)
        c.model.xattn.update(every=2, num_heads=8, head_dim=64)
        c.model.trainable = ("resampler/.*", "xattn/.*", "lm/(embed|head)/added")  # the paper's split
        for n, ds in c.data.datasets.items():
            ds.seq_len = 256 if n == "m3w" else 64
    return c


def random_batches(config, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    vocab, image_id = config.model.lm["vocab_size"], config.model.lm["vocab_size"]
    s = config.model.vision.image_size
    out = {}
    for name, ds in config.data.datasets.items():
        b, length, n, t = ds.batch_size, ds.seq_len, ds.max_media, ds.frames
        tokens = rng.integers(0, vocab, (b, length)).astype(np.int32)
        for i in range(n):
            tokens[:, i * (length // n)] = image_id
        out[name] = dict(media=rng.integers(0, 256, (b, n, t, s, s, 3), dtype=np.uint8), tokens=tokens,
                         targets=np.roll(tokens, -1, 1), loss_mask=np.ones((b, length), np.float32),
                         link_next=np.zeros(b, bool))
    return out


def main(argv: list[str]) -> None:
    del argv
    from flamingo_jax import flops, sharding, train

    config = _CONFIG.value if _CONFIG.value is not None else preset_config(_PRESET.value)
    name = flags.FLAGS["config"].config_filename if _CONFIG.value is not None else _PRESET.value
    mcfg = train.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    tr = train.build(config, mcfg, mesh)
    steps, _ = train.compile_steps(tr)
    host = random_batches(config)
    state, frozen = train.init_state(tr)
    batches = {k: train.to_global(v, tr) for k, v in host.items()}
    shapes = {m: {k: v.shape for k, v in b.items()} for m, b in host.items()}

    t0 = time.perf_counter()
    with sharding.use_mesh_rules(mesh, tr.rules):
        for _ in range(_WARMUP.value):
            state, metrics = steps["all"](state, frozen, batches)
        jax.block_until_ready(metrics)
        compile_and_warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(_STEPS.value):
            state, metrics = steps["all"](state, frozen, batches)
        jax.block_until_ready(metrics)
    step_time = (time.perf_counter() - t0) / _STEPS.value

    peak, source = flops.peak_flops_per_device(config.train.peak_flops, mcfg.dtype)
    # On a CPU the trainer's peak is already this measurement; elsewhere it is the vendor's figure.
    matmul_peak = peak if source.startswith("measured") else flops.measure_matmul_peak(mcfg.dtype)
    step_flops = train.step_flops(tr, shapes)
    tokens = sum(math.prod(s["tokens"]) for s in shapes.values())
    examples = sum(s["tokens"][0] for s in shapes.values())
    device = jax.devices()[0]
    mem = device.memory_stats() or {}
    result = {
        "config": name,
        "device": f"{jax.device_count()} x {device.device_kind}",
        "step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens / step_time, 1),
        "examples_per_s": round(examples / step_time, 1),
        "model_tflops_per_step": round(step_flops / 1e12, 4),
        "peak_tflops_per_device": round(peak / 1e12, 4),
        "peak_source": source,
        "mfu": round(step_flops / step_time / (peak * jax.device_count()), 4),
        "measured_matmul_tflops_per_device": round(matmul_peak / 1e12, 1),
        "mfu_vs_measured_matmul": round(step_flops / step_time / (matmul_peak * jax.device_count()), 4),
        "compile_and_warmup_s": round(compile_and_warmup, 1),
        "peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "device_peak_bytes_in_use_gb": round(mem.get("peak_bytes_in_use", 0) / 2**30, 3) or None,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
