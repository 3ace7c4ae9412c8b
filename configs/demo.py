"""Stage 2 of the README's two-stage demo: a small Flamingo on the built-in synthetic data, all four dataset
kinds, on CPU, on top of the vision encoder that stage 1 (`configs/demo_stage1.py`) pretrained.

    python -m flamingo_jax.recipe --config=configs/demo_two_stage.py --workdir=/tmp/flamingo_demo   # both stages
    python -m flamingo_jax.train --config=configs/demo.py --workdir=DIR \
        --config.model.vision_pretrained=STAGE1_RUN/encoder.safetensors                           # stage 2 alone

The data (coloured shapes, moving shapes, interleaved documents, and a SentencePiece tokenizer trained on their
text) is generated and built into ArrayRecord under `data.synthetic.root` on first use; pass `:DIR` to choose
where (--config=configs/demo.py:/data/syn).

As in the paper, the vision encoder is frozen: its weights come from `model.vision_pretrained` (the trainer
refuses a random frozen encoder; a random NFNet, whose residual branches start at zero, is a useless one). Unlike
the paper, the LM trains too (`model.trainable`): no pretrained LM can be downloaded here.
"""

import os
import tempfile

from flamingo_jax.config import base_config
from flamingo_jax.data.synthetic import synthetic_data_config


def get_config(arg=None):
    c = base_config()
    root = arg or os.path.join(tempfile.gettempdir(), "flamingo_jax_synthetic")
    c.model.vision.update(
        variant=None,
        widths=(32, 64, 96, 128),
        depths=(1, 1, 1, 1),
        stem_widths=(8, 16, 16),
        group_size=16,
        image_size=48,
    )
    c.model.resampler.update(num_layers=2, num_latents=16, num_heads=4, head_dim=32, max_frames=8)
    # Gates start at tanh(0.1) instead of the paper's 0: with batches of 8-16 on a CPU, zero-initialised gates
    # are held at zero by gradient noise for hundreds of steps (docs/benchmarks.md has the measurement).
    c.model.xattn.update(every=1, num_heads=4, head_dim=32, ffw_mult=4, gate_init=0.1)
    c.model.lm = dict(
        family="chinchilla",
        vocab_size=512,
        num_layers=4,
        dim=128,
        num_heads=4,
        head_dim=32,
        mlp_dim=512,
        max_len=256,
    )
    c.model.trainable = ("resampler/.*", "xattn/.*", "lm/.*")  # all but the vision encoder
    c.model.dtype = "float32"  # bf16 is slower than f32 on CPUs (DESIGN.md section 4)
    c.model.frozen_param_dtype = "float32"

    c.data.synthetic.update(enabled=True, root=root, num_train=2000, num_eval=200, image_size=64, vocab_size=512)
    syn = synthetic_data_config(root, batch_sizes={"m3w": 8, "ltip": 16, "align": 16, "vtp": 8})
    c.data.tokenizer = syn.tokenizer
    c.data.datasets = syn.datasets
    for name, ds in c.data.datasets.items():
        with ds.unlocked():
            ds.micro_batches = 1
        ds.seq_len = 128 if name == "m3w" else 32
        # The vision encoder's backward pass dominates a CPU step: at most 3 images per document, 2 frames a video.
        ds.max_media = 3 if name == "m3w" else 1
        ds.frames = 2 if name == "vtp" else 1

    c.train.update(steps=200, log_every=10, eval_every=100, eval_batches=4)
    c.optimizer.update(lr=3e-3, warmup_steps=30, schedule="warmup_cosine", end_lr=3e-4)
    return c
