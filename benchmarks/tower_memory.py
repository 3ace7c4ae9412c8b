"""Peak host memory while loading a pretrained LM tower, against the tower's size in its target dtype.

    python benchmarks/tower_memory.py                       # a ~1.1B LLaMA, saved float32 by transformers
    python benchmarks/tower_memory.py --layers=2 --dim=256  # quick

`transformers` builds a random LLaMA and saves it (safetensors, float32) into --dir (kept, reused). Each
measurement then runs in a fresh process on one CPU device, so device memory is host memory and counts in RSS:

- `loader`: `hf_lm.load_lm_state` into the LM's abstract state with frozen weights in bfloat16, as
  `towers.load_towers` does;
- `trainer`: `train.init_state` of a Flamingo whose LM is that checkpoint (the path a training job takes: random
  init of everything else, towers read into their shards, optimiser state).

The peak is Linux's VmHWM after resetting it (`/proc/self/clear_refs`) just before loading; the baseline is the
RSS at that moment (Python, JAX, the abstract model). The goal (issue 16): (peak - baseline) / target size < 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def make_checkpoint(path: Path, layers: int, dim: int, vocab: int) -> None:
    if (path / "config.json").exists():
        return
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=4 * dim,
        num_hidden_layers=layers,
        num_attention_heads=max(1, dim // 64),
        num_key_value_heads=max(1, dim // 256),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(path)


def measure(mode: str, path: str) -> dict:
    """Runs in a fresh process (see main)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flamingo_jax.models import lm as lm_lib
    from flamingo_jax.pretrained import hf_lm

    lm_fields = hf_lm.lm_config_from_hf(path)
    cfg = lm_lib.LMConfig.from_dict(lm_fields)
    abstract = nnx.eval_shape(lambda: lm_lib.DecoderLM(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    # Frozen weights in bfloat16; the added rows (trainable) stay float32, as in training.
    target = nnx.from_flat_state(
        [
            (p, v.replace(jax.ShapeDtypeStruct(v.get_value().shape, jnp.float32 if "added" in p else jnp.bfloat16)))
            for p, v in nnx.to_flat_state(state)
        ]
    )
    target_bytes = sum(v.get_value().size * v.get_value().dtype.itemsize for _, v in nnx.to_flat_state(target))
    if mode == "trainer":
        from flamingo_jax import config as config_lib
        from flamingo_jax import sharding, train
        from tests.configs import tiny_train_config

        c = tiny_train_config()
        c.model.lm_pretrained = path
        c.model.frozen_param_dtype = "bfloat16"
        c.model.xattn.update(every=cfg.num_layers, num_heads=2, head_dim=8, ffw_mult=1)
        mcfg = config_lib.model_config(c)
        tr = train.build(c, mcfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "loader":
        out = hf_lm.load_lm_state(path, target, cfg)
        jax.block_until_ready(jax.tree.leaves(out))
    else:
        out = train.init_state(tr)
        jax.block_until_ready(jax.tree.leaves(out))
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return dict(
        mode=mode,
        params=sum(v.get_value().size for _, v in nnx.to_flat_state(target)),
        target_gib=target_bytes / 2**30,
        file_gib=sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**30,
        baseline_gib=base / 2**30,
        peak_gib=peak / 2**30,
        added_gib=(peak - base) / 2**30,
        ratio=(peak - base) / target_bytes,
        seconds=seconds,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "flamingo_jax_llama_1b"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--modes", default="loader,trainer")
    ap.add_argument("--_measure", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure, args.dir)))
        return
    make_checkpoint(Path(args.dir), args.layers, args.dim, args.vocab)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    print(
        f"{'mode':8} {'params':>8} {'file GiB':>9} {'target GiB':>10} {'base GiB':>9} {'peak GiB':>9} "
        f"{'added GiB':>10} {'added/target':>12} {'s':>6}"
    )
    for mode in args.modes.split(","):
        out = (
            subprocess.run(
                [sys.executable, __file__, "--dir", args.dir, "--_measure", mode],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(out)
        print(
            f"{r['mode']:8} {r['params'] / 1e9:7.2f}B {r['file_gib']:9.2f} {r['target_gib']:10.2f} "
            f"{r['baseline_gib']:9.2f} {r['peak_gib']:9.2f} {r['added_gib']:10.2f} {r['ratio']:12.2f} "
            f"{r['seconds']:6.1f}"
        )


if __name__ == "__main__":
    main()
