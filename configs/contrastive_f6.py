"""Stage 1 at the paper's scale: NFNet-F6 pretrained contrastively with a BERT-style text encoder (paper,
section 3.1 and appendix B.1.3), on ALIGN + LTIP with per-dataset accumulation, at 288 px, into a 1376-d joint
embedding. The encoder it produces is the frozen vision tower of `flamingo_3b.py` / `flamingo_9b.py` /
`flamingo_80b.py`:

    python -m flamingo_jax.train --config=configs/contrastive_f6.py --workdir=gs://B/stage1 \
        --config.data.tokenizer=TOKENIZER --config.data.datasets.align.data_dir=... \
        --config.data.datasets.ltip.data_dir=...
    python -m flamingo_jax.export --encoder_only --workdir=gs://B/stage1 --out=/data/f6_stage1.safetensors
    python -m flamingo_jax.train --config=configs/flamingo_3b.py ... \
        --config.model.vision_pretrained=/data/f6_stage1.safetensors

Every pair of a dataset's global batch is a negative for every other (the embeddings are gathered over the
batch's mesh axes), so more devices buy more negatives, not only throughput. Micro-batching cannot stand in for a
larger batch here (the loss does not decompose; the trainer refuses it). The text tower is BERT-base-sized and
trains from scratch, or from an HF `BertModel` directory (`--config.model.text_pretrained`, whose config.json
then decides its architecture; its tokenizer goes in `data.tokenizer`). Adam with gradient clipping, no weight
decay; the inverse temperature trains (CLIP's initial 1/0.07, capped at 100). The architecture, resolution,
embedding size and loss follow the paper; the batch, learning rate and step count are our starting point, to be
tuned to the pod. Check the memory per chip of your target before a run:
`python -m flamingo_jax.tools.plan --config=configs/contrastive_f6.py --topology=...`.
"""

from flamingo_jax.config import base_config, contrastive_model


def get_config(arg=None):
    c = base_config()
    c.stage = "contrastive"
    c.model = contrastive_model(image_size=288)
    c.data.datasets = {k: c.data.datasets[k] for k in ("align", "ltip")}
    for ds in c.data.datasets.values():
        ds.batch_size = 4096
        ds.seq_len = 64
        ds.resize = "random_crop"
    c.mesh = (-1, 1, 1)  # NFNet weights are small (438M); data parallel, sharding the optimiser state is optional
    c.optimizer.update(
        lr=1e-3,
        schedule="warmup_cosine",
        warmup_steps=5000,
        end_lr=0.0,
        weight_decay=0.0,
        clip_norm=1.0,
        no_decay=(".*norm.*", ".*bias", ".*temperature"),
    )
    c.train.update(steps=1_200_000, eval_every=10_000, eval_batches=4)
    c.checkpoint.every_steps = 5000
    return c
