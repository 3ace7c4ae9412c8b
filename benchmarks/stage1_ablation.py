"""The paper's dataset-combining ablation for stage 1, at toy scale: accumulate vs merged vs round_robin.

    python benchmarks/stage1_ablation.py [--steps=150] [--strategies=accumulate,merged,round_robin] [--out=DIR]

Each strategy trains `configs/demo_stage1.py` (LTIP-style exact captions and ALIGN-style short, noisier alt-text,
lambda 0.2 each) from the same seed for the same number of steps, then reports zero-shot retrieval R@1 on each
dataset's held-out pairs and zero-shot classification of the 32 colour-shape classes. `accumulate` (the paper's
choice) and `merged` see both datasets' batches every step; `round_robin` sees one dataset per step, so it also
gets a row at twice the steps (equal examples). One process runs them in turn: run nothing else beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stage1_config(root: str | None):
    spec = importlib.util.spec_from_file_location("demo_stage1", ROOT / "configs" / "demo_stage1.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--strategies", default="accumulate,merged,round_robin")
    p.add_argument("--data_root", default=None, help="synthetic data directory (default: the demo's)")
    p.add_argument("--out", default=None, help="workdirs go here (default: a temporary directory)")
    args = p.parse_args()

    from flamingo_jax import train
    from flamingo_jax.metrics import quiet_library_logs

    quiet_library_logs()
    out = args.out or tempfile.mkdtemp(prefix="stage1_ablation_")
    runs = []
    for strategy in args.strategies.split(","):
        for steps in (args.steps, 2 * args.steps) if strategy == "round_robin" else (args.steps,):
            c = stage1_config(args.data_root)
            c.train.update(strategy=strategy, steps=steps, eval_every=steps, eval_batches=3)
            c.checkpoint.every_steps = 0
            t0 = time.perf_counter()
            m = train.train(c, os.path.join(out, f"{strategy}_{steps}"))
            runs.append(dict(strategy=strategy, steps=steps, wall_s=time.perf_counter() - t0, **m))
    keys = [
        ("eval/retrieval/ltip/i2t_r1", "LTIP i2t R@1"),
        ("eval/retrieval/ltip/t2i_r1", "LTIP t2i R@1"),
        ("eval/retrieval/align/i2t_r1", "ALIGN i2t R@1"),
        ("eval/retrieval/align/t2i_r1", "ALIGN t2i R@1"),
        ("eval/zeroshot/top1", "zero-shot top-1"),
    ]
    n = int(runs[0].get("eval/retrieval/ltip/pairs", 0))
    print(f"\nheld-out pairs per dataset: {n} (chance R@1 = {1 / max(n, 1):.4f}); zero-shot chance 1/32 = 0.031")
    print("| strategy | steps | " + " | ".join(h for _, h in keys) + " | wall |")
    print("|---" * (len(keys) + 3) + "|")
    for r in runs:
        cells = " | ".join(f"{r.get(k, float('nan')):.3f}" for k, _ in keys)
        print(f"| {r['strategy']} | {r['steps']} | {cells} | {r['wall_s']:.0f} s |")
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(runs, f, indent=1)
    print(f"\nruns and ablation.json in {out}")


if __name__ == "__main__":
    main()
