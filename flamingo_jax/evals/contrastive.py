"""Evaluation of a stage-1 dual encoder: zero-shot retrieval and zero-shot classification from class names.

Both work on L2-normalised embeddings (numpy, float64 similarities), so they are independent of the mesh that
computed them:

- Retrieval over N held-out pairs: image -> text and text -> image Recall@K, the fraction of queries whose own
  partner ranks among the K most similar of all N candidates. A tie with the partner counts against it (the
  rank is 1 + the number of other candidates scoring at least as high), so a collapsed encoder that maps
  everything to one point scores 0, not 1. Chance for a random encoder is K / N.
- Classification (CLIP's protocol): each class name is put into every prompt template, the text embeddings are
  averaged over templates and renormalised, and an image gets the class of highest cosine similarity. Images
  come from an ImageNet-style folder, one sub-directory per class (`read_image_folder`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from flamingo_jax.data import preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _ranks(sim: np.ndarray) -> np.ndarray:
    """For each row i, 0-based rank of column i: the number of other columns scoring at least sim[i, i]."""
    own = np.diag(sim)[:, None]
    return np.sum(sim >= own, axis=1) - 1


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """{'i2t_r1': ..., 't2i_r1': ..., ...} for pairs (image_emb[i], text_emb[i]); embeddings [N, E]."""
    img, txt = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(f"retrieval: image embeddings {img.shape} and text embeddings {txt.shape} must be [N, E]")
    sim = img @ txt.T
    out = {}
    for name, ranks in (("i2t", _ranks(sim)), ("t2i", _ranks(sim.T))):
        for k in ks:
            out[f"{name}_r{k}"] = float(np.mean(ranks < k))
    return out


def read_image_folder(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N, S, S, 3], labels [N], class names) from PATH/CLASS/*.{png,jpg,...}.

    Class names are the directory names with '_' read as a space ('red_circle' -> 'red circle'), in sorted
    directory order. Images are resized as evaluation does (aspect kept, zero padded). An undecodable image is
    an error naming its file: an evaluation set must be complete to be comparable."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"zero-shot classification folder {path!r} does not exist")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if len(classes) < 2:
        raise ValueError(f"{path}: needs at least two class sub-directories, found {classes}")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(path, cls))):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            file = os.path.join(path, cls, name)
            with open(file, "rb") as f:
                try:
                    img = preprocess.decode_image(f.read())
                except preprocess.MediaError as e:
                    raise preprocess.MediaError(f"{file}: {e}") from e
            images.append(
                preprocess.preprocess_frames(img[None], image_size, rng=None, resize="pad", augment_=False)[0]
            )
            labels.append(label)
    if not images:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return np.stack(images), np.asarray(labels), [c.replace("_", " ") for c in classes]


def class_embeddings(
    names: Sequence[str], templates: Sequence[str], embed_texts: Callable[[list[str]], np.ndarray]
) -> np.ndarray:
    """[C, E]: each class's text embedding averaged over `templates` ('a photo of a {}.'), renormalised."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"zero-shot prompts {list(templates)}: each needs a '{{}}' for the class name")
    per_template = np.stack([np.asarray(embed_texts([t.format(n) for n in names]), np.float64) for t in templates])
    mean = per_template.mean(axis=0)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def classification_metrics(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 and top-5 accuracy of nearest-class-embedding classification."""
    sim = np.asarray(image_emb, np.float64) @ np.asarray(class_emb, np.float64).T
    own = sim[np.arange(len(labels)), labels][:, None]
    rank = np.sum(sim >= own, axis=1) - 1  # ties count against the true class, as in retrieval
    return {"top1": float(np.mean(rank < 1)), "top5": float(np.mean(rank < min(5, sim.shape[1])))}
