"""Input pipeline throughput: examples/s per dataset kind on the built-in synthetic data.

    python benchmarks/input_pipeline.py [--batch_size=32] [--workers=0] [--image_size=64] [--num_batches=20]

Prepares the synthetic mixture once under --data_dir (reused afterwards), then for each dataset times
`next()` on a training loader after a warm-up (which also hides worker start-up). The numbers measure
decoding, preprocessing, tokenisation and batching on this host's CPUs; a trainer overlaps them with its step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flamingo_jax.data import loader, synthetic
from flamingo_jax.data.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=32, help="Per-host batch size (all kinds).")
    parser.add_argument("--workers", type=int, default=0, help="Grain worker processes per loader.")
    parser.add_argument("--image_size", type=int, default=64, help="Model resolution S (loader output).")
    parser.add_argument("--source_image_size", type=int, default=64, help="Resolution of the synthetic files.")
    parser.add_argument("--num_batches", type=int, default=20, help="Timed batches per kind.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num_train", type=int, default=2000, help="Synthetic size (see synthetic.py).")
    parser.add_argument("--kinds", default=",".join(synthetic.NAMES), help="Comma-separated dataset names.")
    parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "flamingo_jax_bench_data"))
    args = parser.parse_args()

    t0 = time.perf_counter()
    prepared = synthetic.prepare_synthetic(args.data_dir, num_train=args.num_train, image_size=args.source_image_size)
    print(f"prepared synthetic data in {time.perf_counter() - t0:.1f}s under {args.data_dir}")
    cfg = synthetic.synthetic_data_config(args.data_dir)
    tok = Tokenizer.from_path(prepared["tokenizer"])
    print(f"{'dataset':8} {'kind':12} {'examples/s':>11} {'batches/s':>10} {'ms/batch':>9}")
    results = {}
    for name in args.kinds.split(","):
        ds = cfg.datasets[name]
        it = loader.make_loader(
            ds, split="train", tokenizer=tok, batch_size=args.batch_size, image_size=args.image_size,
            seed=0, train=True, worker_count=args.workers,
        )  # fmt: skip
        for _ in range(args.warmup):
            next(it)
        t = time.perf_counter()
        for _ in range(args.num_batches):
            next(it)
        dt = time.perf_counter() - t
        it.close()  # Stop workers before the next kind, so kinds do not compete for the CPUs.
        eps = args.num_batches * args.batch_size / dt
        results[name] = round(eps, 1)
        ms = 1000 * dt / args.num_batches
        print(f"{name:8} {ds.kind:12} {eps:11.1f} {args.num_batches / dt:10.2f} {ms:9.1f}")
    print(json.dumps({"args": vars(args), "examples_per_s": results}))


if __name__ == "__main__":
    main()
