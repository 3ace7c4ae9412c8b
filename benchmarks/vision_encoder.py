"""Frozen vision-encoder throughput: a jitted NFNet feature forward, the part of a Flamingo step that gets no
backward pass. Compare its TFLOP/s with the whole step's to see where a step's time goes.

    python benchmarks/vision_encoder.py --variant=F6 --image_size=320 --batch=120   # the 3B step's frames
    python benchmarks/vision_encoder.py --variant=F0 --image_size=64 --batch=8      # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import flops
from flamingo_jax.models import nfnet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="F6", choices=sorted(nfnet.NFNET_VARIANTS))
    p.add_argument("--image_size", type=int, default=320)
    p.add_argument("--batch", type=int, default=120)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()

    dtype = jnp.dtype(args.dtype)
    model = nfnet.NFNet(args.variant, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    images = jax.random.normal(jax.random.key(1), (args.batch, args.image_size, args.image_size, 3), dtype)

    @jax.jit
    def features(params, x):
        return nnx.merge(graphdef, params).features(x)

    step_flops = flops.fn_flops(features, params, images)
    t0 = time.perf_counter()
    jax.block_until_ready(features(params, images))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        out = features(params, images)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / args.iters
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "variant": args.variant,
                "image_size": args.image_size,
                "batch": args.batch,
                "device": device.device_kind,
                "grid": list(out.shape[1:]),
                "forward_s": round(dt, 4),
                "images_per_s": round(args.batch / dt, 1),
                "tflops_per_forward": round(step_flops / 1e12, 3),
                "achieved_tflops_per_s": round(step_flops / dt / 1e12, 2),
                "compile_s": round(compile_s, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
