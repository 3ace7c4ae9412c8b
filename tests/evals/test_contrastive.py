"""Zero-shot retrieval and classification metrics against brute force, and the class-folder reader."""

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.evals import contrastive as evals


def unit(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_recall(sim, k):
    hits = 0
    for i in range(len(sim)):
        better = sum(1 for j in range(len(sim)) if j != i and sim[i, j] >= sim[i, i])
        hits += better < k
    return hits / len(sim)


def test_retrieval_recall_matches_brute_force_both_directions():
    rng = np.random.default_rng(0)
    img = unit(rng, (40, 6))
    txt = unit(rng, (40, 6)) + 0.8 * img  # partly aligned: recalls strictly between 0 and 1
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    got = evals.retrieval_metrics(img, txt)
    sim = img @ txt.T
    for k in (1, 5, 10):
        assert got[f"i2t_r{k}"] == pytest.approx(brute_recall(sim, k))
        assert got[f"t2i_r{k}"] == pytest.approx(brute_recall(sim.T, k))
    assert 0 < got["i2t_r1"] < got["i2t_r5"] < 1


def test_a_collapsed_encoder_retrieves_nothing():
    same = np.tile(unit(np.random.default_rng(1), (1, 4)), (10, 1))
    got = evals.retrieval_metrics(same, same)
    assert got["i2t_r1"] == got["t2i_r5"] == 0.0  # ties count against the partner


def test_zero_shot_classification_uses_template_averaged_class_embeddings():
    rng = np.random.default_rng(2)
    names = ["red circle", "blue square", "green diamond"]
    directions = {n: unit(rng, (8,)) for n in names}

    def embed_texts(texts):  # a text tower that knows the class name whatever the template
        return np.stack([next(directions[n] for n in names if n in t) for t in texts])

    class_emb = evals.class_embeddings(names, ["{}", "a photo of a {}."], embed_texts)
    np.testing.assert_allclose(class_emb, np.stack([directions[n] for n in names]), atol=1e-12)
    labels = rng.integers(0, 3, 30)
    images = class_emb[labels] + 0.05 * rng.normal(size=(30, 8))
    labels_wrong = labels.copy()
    labels_wrong[:6] = (labels[:6] + 1) % 3
    acc = evals.classification_metrics(images, class_emb, labels_wrong)
    assert acc["top1"] == pytest.approx(24 / 30) and acc["top5"] == 1.0
    with pytest.raises(ValueError, match=r"needs a '\{\}'"):
        evals.class_embeddings(names, ["a photo"], embed_texts)


def test_image_folder_reads_classes_in_order_and_names_a_bad_file(tmp_path):
    rng = np.random.default_rng(3)
    for cls in ("red_circle", "blue_square"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "red_circle" / "notes.txt").write_text("not an image")
    images, labels, names = evals.read_image_folder(str(tmp_path), 16)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert names == ["blue square", "red circle"] and labels.tolist() == [0, 0, 1, 1]
    (tmp_path / "blue_square" / "2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"blue_square/2\.png"):
        evals.read_image_folder(str(tmp_path), 16)
