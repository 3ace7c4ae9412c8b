"""The trainer's stage-specific pieces for stage 1 (`config.stage = 'contrastive'`).

The paper pretrains its NFNet-F6 with a text encoder by a two-way contrastive loss on ALIGN + LTIP (section 3.1),
then freezes it for stage 2. Stage 1 runs through the same trainer as stage 2 (`flamingo_jax.train`): the same
mesh, sharded state, per-dataset accumulation, checkpoints, resume and metrics. What differs lives here (config
checks, batch shapes, FLOPs, evaluation) and in `train_step.OBJECTIVES['contrastive']` (the loss).

    python -m flamingo_jax.train --config=configs/contrastive_f6.py --workdir=RUN     # stage 1
    python -m flamingo_jax.export --encoder_only --workdir=RUN --out=RUN/encoder.safetensors
    ... stage 2 with config.model.vision_pretrained=RUN/encoder.safetensors (frozen there)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from flamingo_jax import flops
from flamingo_jax.data import examples, host_rows
from flamingo_jax.data import loader as data_loader
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.evals import contrastive as evals
from flamingo_jax.models.contrastive import ContrastiveConfig

if TYPE_CHECKING:
    from flamingo_jax.train import Trainer


def validate(config: ml_collections.ConfigDict, mcfg: ContrastiveConfig) -> None:
    """Stage 1 reads image-text pairs only, one micro-batch per dataset (the loss does not split)."""
    for name, ds in config.data.datasets.items():
        where = f"config.data.datasets.{name}"
        if ds.kind != "pairs":
            raise ValueError(f"{where}.kind={ds.kind!r}: the contrastive stage trains on image-text pairs only")
        if int(ds.get("micro_batches", 1)) != 1:
            raise ValueError(
                f"{where}.micro_batches={ds.micro_batches}: a contrastive loss does not split into micro-batches "
                "(every pair is a negative of every other); use 1 and a batch that fits, or more devices"
            )
        seq_len = ds.get("seq_len", data_loader.default_dataset_config(ds.kind).seq_len)
        if seq_len > mcfg.text.max_len:
            raise ValueError(f"{where}.seq_len={seq_len} exceeds model.text.max_len={mcfg.text.max_len}")
    zs = config.eval.zeroshot
    if zs.data_dir and not zs.prompts:
        raise ValueError("config.eval.zeroshot.prompts is empty: give at least one template such as '{}'")


def check_tokenizer(tok: Tokenizer, mcfg: ContrastiveConfig, path: str) -> None:
    if tok.own_vocab_size > mcfg.text.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tok.own_vocab_size} ids but model.text.vocab_size is {mcfg.text.vocab_size}"
        )


def batch_shapes(ds: ml_collections.ConfigDict, image_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """A dataset's global batch (`ds` with defaults) as {key: (shape, dtype)}: what the loader yields."""
    b, s, L = int(ds.batch_size), int(image_size), int(ds.seq_len)
    return dict(
        media=((b, 1, 1, s, s, 3), np.uint8),
        text=((b, L), np.int32),
        text_mask=((b, L), np.bool_),
        row_mask=((b,), np.float32),
    )


def dataset_flops(tr: Trainer, batch_shapes: Mapping[str, Mapping[str, tuple]]) -> dict[str, float]:
    """Model FLOPs of one step on each dataset's batch: 3 x forward for a trained tower, 1 x for a frozen one
    (its weights are constants: no backward pass), the similarity matrices included."""
    p = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tr.parts.trainable)
    f = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tr.parts.frozen)
    p, f = nnx.to_pure_dict(p), nnx.to_pure_dict(f)
    model = tr.parts.merge
    out = {}
    for name, shapes in batch_shapes.items():
        b, _, _, h, w, _ = shapes["media"]
        images = jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8)
        ids = jax.ShapeDtypeStruct(shapes["text"], jnp.int32)
        mask = jax.ShapeDtypeStruct(shapes["text"], jnp.bool_)
        vision = flops.fn_flops(lambda p, f, x: model(p, f).embed_images(x), p, f, images)
        text = flops.fn_flops(lambda p, f, i, m: model(p, f).embed_text(i, m), p, f, ids, mask)
        sims = 2 * 2.0 * b * b * tr.mcfg.embed_dim  # both directions' logits
        out[name] = (3 if "vision" in p else 1) * vision + (3 if "text" in p else 1) * text + 3 * sims
    return out


def _gather(x: jax.Array) -> np.ndarray:
    """A batch-sharded global array, whole, on every process."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.lru_cache(maxsize=2)
def _image_folder(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    images, labels, names = evals.read_image_folder(path, image_size)
    return images, labels, tuple(names)


def _embed_rows(tr: Trainer, embed_step: Any, state: dict, frozen: Any, to_global: Any, batch: dict, key: str) -> Any:
    """Embeddings of every row of host-side `batch` (the same on every process), in global batches of
    `zeroshot.batch_size` (the last one padded): each process feeds its own rows of each."""
    bs = int(tr.config.eval.zeroshot.batch_size)
    rows_for = host_rows.rows_for(tr.mesh, tr.rules)
    n = len(next(iter(batch.values())))
    out = []
    for start in range(0, n, bs):
        chunk = {k: v[start : start + bs] for k, v in batch.items()}
        pad = bs - len(next(iter(chunk.values())))
        chunk = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
        rows = np.asarray(rows_for(bs))
        local = {k: v[rows] for k, v in chunk.items()}
        out.append(_gather(embed_step(state["params"], frozen, to_global(local, tr, bs))[key])[: bs - pad])
    return np.concatenate(out)


def evaluate(
    tr: Trainer, embed_step: Any, state: dict, frozen: Any, tok: Tokenizer, to_global: Any
) -> dict[str, float]:
    """Zero-shot retrieval on each dataset's held-out pairs (`train.eval_batches` batches of each), and zero-shot
    classification of `config.eval.zeroshot.data_dir`'s class folders from prompts, when set."""
    cfg = tr.config
    iters = data_loader.make_eval_mixture(
        cfg.data,
        tokenizer=tok,
        image_size=tr.mcfg.vision.image_size,
        seed=cfg.seed,
        rows_for=host_rows.rows_for(tr.mesh, tr.rules),
        worker_count=0,
        stage="contrastive",
    )
    metrics: dict[str, float] = {}
    per_dataset = []
    try:
        for name, it in iters.items():
            img, txt, keep = [], [], []
            for i, batch in enumerate(it):
                if i >= cfg.train.eval_batches:
                    break
                out = embed_step(state["params"], frozen, to_global(batch, tr, cfg.data.datasets[name].batch_size))
                img.append(_gather(out["image"]))
                txt.append(_gather(out["text"]))
                keep.append(_gather(out["row_mask"]))
            if not img:
                continue
            k = np.concatenate(keep) > 0
            r = evals.retrieval_metrics(np.concatenate(img)[k], np.concatenate(txt)[k])
            metrics.update({f"eval/retrieval/{name}/{m}": v for m, v in r.items()})
            metrics[f"eval/retrieval/{name}/pairs"] = float(k.sum())
            per_dataset.append(r)
    finally:
        for it in iters.values():
            it.close()
    for m in per_dataset[0] if per_dataset else ():
        metrics[f"eval/{m}"] = float(np.mean([r[m] for r in per_dataset]))
    zs = cfg.eval.zeroshot
    if zs.data_dir:
        images, labels, names = _image_folder(zs.data_dir, tr.mcfg.vision.image_size)
        image_emb = _embed_rows(tr, embed_step, state, frozen, to_global, {"media": images[:, None, None]}, "image")
        seq_len = min(int(tr.mcfg.text.max_len), 64)

        def embed_texts(texts: list[str]) -> np.ndarray:
            ids, mask = zip(*(examples.text_ids(t, seq_len, tok) for t in texts))
            batch = {"text": np.stack(ids), "text_mask": np.stack(mask)}
            return _embed_rows(tr, embed_step, state, frozen, to_global, batch, "text")

        class_emb = evals.class_embeddings(names, list(zs.prompts), embed_texts)
        acc = evals.classification_metrics(image_emb, class_emb, labels)
        metrics.update({f"eval/zeroshot/{k}": v for k, v in acc.items()})
        metrics["eval/zeroshot/chance"] = 1.0 / len(names)
    return metrics
