"""Stage 1 of the README's two-stage demo: the vision encoder pretrained contrastively on the synthetic pairs.

    python -m flamingo_jax.train --config=configs/demo_stage1.py --workdir=/tmp/flamingo_demo/stage1

A small NFNet and a small BERT-style text encoder learn a joint embedding from the LTIP-style (long, exact) and
ALIGN-style (short alt-text, noisier) synthetic pairs, with the paper's per-dataset accumulation (0.2 each, which
only scales the learning rate). Evaluation reports zero-shot retrieval R@1/5/10 on held-out pairs (chance: K / N)
and zero-shot classification of 32 colour-shape classes from their names (chance 1/32). `configs/demo.py` then
freezes this encoder for stage 2 (`python -m flamingo_jax.recipe`, the README's main job, runs both).
"""

import os
import tempfile

from flamingo_jax.config import base_config, contrastive_model
from flamingo_jax.data.synthetic import synthetic_data_config


def get_config(arg=None):
    c = base_config()
    root = arg or os.path.join(tempfile.gettempdir(), "flamingo_jax_synthetic")
    c.stage = "contrastive"
    c.model = contrastive_model(image_size=48)
    # The demo's stage-2 vision tower (configs/demo.py), trained here instead of there.
    c.model.vision.update(
        variant=None, widths=(32, 64, 96, 128), depths=(1, 1, 1, 1), stem_widths=(8, 16, 16), group_size=16
    )
    c.model.text.update(vocab_size=512, num_layers=2, dim=128, num_heads=4, mlp_dim=512, max_len=64)
    c.model.update(embed_dim=128, dtype="float32", frozen_param_dtype="float32")

    c.data.synthetic.update(enabled=True, root=root, num_train=2000, num_eval=200, image_size=64, vocab_size=512)
    syn = synthetic_data_config(root, batch_sizes={"m3w": 8, "ltip": 32, "align": 32, "vtp": 8})
    c.data.tokenizer = syn.tokenizer
    c.data.datasets = {k: syn.datasets[k] for k in ("ltip", "align")}
    for ds in c.data.datasets.values():
        ds.seq_len = 40
        with ds.unlocked():
            ds.micro_batches = 1
    c.eval.zeroshot.update(data_dir=os.path.join(root, "sources", "classify"), prompts=("{}",), batch_size=64)

    c.train.update(steps=150, log_every=10, eval_every=50, eval_batches=6)
    c.optimizer.update(
        lr=2e-3,
        warmup_steps=30,
        schedule="warmup_cosine",
        end_lr=1e-4,
        weight_decay=0.0,  # Adam, as the paper's stage 1
        no_decay=(".*norm.*", ".*bias", ".*temperature"),
    )
    return c
