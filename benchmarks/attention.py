"""Attention kernels at the model's own attention sites: XLA against cuDNN flash attention (NVIDIA GPUs).

    python benchmarks/attention.py            # Flamingo-3B shapes, batch 8
    python benchmarks/attention.py --batch=4 --lm_len=2048

For each site (the LM's causal self-attention, the masked media cross-attention, the resampler's latents
attending to visual features) it runs forward and backward in bfloat16 with both kernels and prints:
- the largest error of the output and of dq/dk/dv against a float32 XLA reference, for each kernel, so a
  kernel is only trusted when it is as close to the reference as XLA's own bfloat16 run;
- whether anything is non-finite (tokens before the first image see no image; the model's mask lets them
  attend to every key and zeroes their output, because a fully masked row makes cuDNN's dq NaN);
- forward+backward time per call.
On a machine without an NVIDIA GPU only the XLA rows are printed.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import attention, xattn


def sites(batch: int, lm_len: int, heads: int, head_dim: int, n_media: int, latents: int, grid: int, frames: int):
    """(name, q/k/v shapes, mask or None, is_causal, zero_rows) for each attention site of the model."""
    rng = np.random.default_rng(0)
    # media_idx as `xattn.media_index` makes it: -1 before the first image, then the last image seen.
    starts = np.sort(rng.integers(0, lm_len, (batch, n_media)), axis=1)
    starts[:, 0] = np.maximum(starts[:, 0], lm_len // 8)  # at least lm_len/8 tokens see no image
    media_idx = (np.arange(lm_len)[None, :, None] >= starts[:, None, :]).sum(-1) - 1
    xmask = xattn.media_attention_mask(jnp.asarray(media_idx), n_media, latents)
    return [
        ("lm_self_attention", (batch, lm_len, heads, head_dim), (batch, lm_len, heads, head_dim), None, True, None),
        (
            "media_cross_attention",
            (batch, lm_len, heads, head_dim),
            (batch, n_media * latents, heads, head_dim),
            xmask,
            False,
            jnp.asarray(media_idx >= 0),
        ),
        (
            "resampler",
            (batch * n_media, latents, heads, head_dim),
            (batch * n_media, frames * grid + latents, heads, head_dim),
            None,
            False,
            None,
        ),
    ]


def run_site(name, q_shape, kv_shape, mask, is_causal, keep_rows, impls, iters):
    keys = jax.random.split(jax.random.key(hash(name) % 2**31), 4)
    q = jax.random.normal(keys[0], q_shape, jnp.float32)
    k = jax.random.normal(keys[1], kv_shape, jnp.float32)
    v = jax.random.normal(keys[2], kv_shape, jnp.float32)
    cot = jax.random.normal(keys[3], q_shape, jnp.float32)

    def loss(impl, dtype):
        def f(q, k, v):
            out = attention.dot_product_attention(
                q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask, is_causal=is_causal, implementation=impl
            )
            if keep_rows is not None:  # as the model does: rows with no visible key contribute exactly zero
                out = jnp.where(keep_rows[:, :, None, None], out, 0)
            return jnp.sum(out.astype(jnp.float32) * cot), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, ref_out), ref_grads = loss("xla", jnp.float32)(q, k, v)
    ref = (ref_out, *ref_grads)
    rows = []
    for impl in impls:
        fn = loss(impl, jnp.bfloat16)
        try:
            (_, out), grads = fn(q, k, v)
        except Exception as e:  # a kernel that refuses the shape is a result to report
            rows.append(dict(site=name, impl=impl, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            continue
        got = (out, *grads)
        errs = {
            n: float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / (float(jnp.max(jnp.abs(r))) + 1e-30))
            for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref)
        }
        finite = all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in got)
        jax.block_until_ready(fn(q, k, v))
        t0 = time.perf_counter()
        for _ in range(iters):
            res = fn(q, k, v)
        jax.block_until_ready(res)
        ms = (time.perf_counter() - t0) / iters * 1e3
        rows.append(
            dict(site=name, impl=impl, q=list(q_shape), kv=list(kv_shape), fwd_bwd_ms=round(ms, 3), finite=finite)
            | {f"max_rel_err_{n}": round(e, 5) for n, e in errs.items()}
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lm_len", type=int, default=256)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--n_media", type=int, default=5)
    p.add_argument("--latents", type=int, default=64)
    p.add_argument("--grid", type=int, default=100, help="visual tokens per frame (NFNet-F6 at 320 px: 10x10)")
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()

    impls = ["xla"] + (["cudnn"] if jax.devices()[0].platform == "gpu" else [])
    print(f"# {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for site in sites(
        args.batch, args.lm_len, args.heads, args.head_dim, args.n_media, args.latents, args.grid, args.frames
    ):
        for row in run_site(*site, impls=impls, iters=args.iters):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
