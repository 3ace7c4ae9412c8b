"""The synthetic dataset: formats on disk, determinism, captions that only the pixels can explain."""

import csv
import hashlib
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from flamingo_jax.data import preprocess, synthetic
from flamingo_jax.data.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _digest(root):
    h = hashlib.sha1()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):  # Including tokenizer.model: SentencePiece training is deterministic too.
            h.update(f.encode())
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_cli_writes_every_source_format(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "syn"
    cmd = [
        sys.executable,
        "-m",
        "flamingo_jax.data.synthetic",
        f"--out={out}",
        "--num_train=8",
        "--num_eval=4",
    ]
    proc = subprocess.run([*cmd, "--image_size=32"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for split, n in (("train", 8), ("eval", 4)):
        docs = [json.loads(line) for line in (out / "m3w" / split / "docs-00000.jsonl").read_text().splitlines()]
        assert len(docs) == synthetic.counts(n)["m3w"]
        for doc in docs:
            assert len(doc["texts"]) == len(doc["images"])
            for img in filter(None, doc["images"]):
                assert (out / "m3w" / split / img).is_file()
        pairs = [json.loads(line) for line in (out / "ltip" / split / "captions.jsonl").read_text().splitlines()]
        assert len(pairs) == n and all((out / "ltip" / split / p["image"]).is_file() for p in pairs)
        with tarfile.open(out / "align" / split / "00000.tar") as tar:
            names = tar.getnames()
        assert len(names) == 3 * n and {x.split(".", 1)[1] for x in names} == {"jpg", "txt", "json"}
        rows = list(csv.DictReader((out / "vtp" / split / "results.csv").read_text().splitlines()))
        assert len(rows) == synthetic.counts(n)["vtp"]
        for row in rows:
            assert (out / "vtp" / split / "videos" / row["page_dir"] / f"{row['videoid']}.mp4").is_file()
    tok = Tokenizer.from_path(out / "tokenizer.model")
    assert tok.base_vocab_size == 512  # The default --vocab_size, exactly (model configs rely on it).
    caption = pairs[0]["caption"]
    assert tok.decode(tok.encode(caption)) == caption
    img = preprocess.decode_image((out / "ltip" / "eval" / pairs[0]["image"]).read_bytes())
    assert img.shape == (32, 32, 3)


def test_deterministic_from_seed(tmp_path):
    kw = dict(num_train=8, num_eval=4, image_size=32, vocab_size=64)
    synthetic.write_sources(str(tmp_path / "a"), seed=3, **kw)
    synthetic.write_sources(str(tmp_path / "b"), seed=3, **kw)
    synthetic.write_sources(str(tmp_path / "c"), seed=4, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    # The held-out split is a different random stream from train.
    a_train = (tmp_path / "a" / "ltip" / "train" / "captions.jsonl").read_text().splitlines()
    a_eval = (tmp_path / "a" / "ltip" / "eval" / "captions.jsonl").read_text().splitlines()
    assert a_train[:4] != a_eval


def test_captions_describe_the_pixels():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = synthetic.random_scene(rng)
        img = synthetic.render(scene, 64, (10, 10, 10))
        text = synthetic.describe(scene)
        for s in scene:
            cx, cy = synthetic._centre(s, 64)
            # The named colour is what is drawn at the shape's centre (shapes never overlap: distinct cells).
            np.testing.assert_array_equal(img[int(cy), int(cx)], synthetic.COLOURS[s.colour])
            assert s.colour in text and s.shape in text and synthetic.PLACES[s.cell] in text
        # Counts: "two red circles" iff two shapes share colour and shape.
        for colour, shape, cells in synthetic._groups(scene):
            if len(cells) > 1:
                assert f"{synthetic.NUMBERS[len(cells)]} {colour} {shape}s" in text
        short = synthetic.describe_short(scene, rng)
        assert all(s.colour in short and s.shape in short for s in scene)


def _centroid(frame, colour):
    ys, xs = np.nonzero((np.abs(frame.astype(int) - colour) < 40).all(-1))
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("ext", ["mp4", "webm"])
def test_video_captions_say_how_the_shape_moves(tmp_path, ext):
    rng = np.random.default_rng(1)
    checked = 0
    for i in range(6):
        frames, caption = synthetic._video(rng, 64, fps=2)
        words = caption.split()
        colour = synthetic.COLOURS[words[1]]
        if "while" in caption and words[words.index("while") + 2] == words[1]:
            continue  # A still shape of the same colour would blur the centroid.
        path = str(tmp_path / f"v{i}.{ext}")
        synthetic.write_video(path, frames, 2)
        with open(path, "rb") as f:
            data = f.read()
        duration, n = preprocess.probe_video(data)
        assert n == len(frames) and abs(duration - len(frames) / 2) < 1e-3
        clip = preprocess.decode_video(data, 8, 1.0, None, duration)  # 8 frames at 1 FPS, centred.
        move = _centroid(clip[-1], colour) - _centroid(clip[0], colour)
        direction = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
        expected = next(d for word, d in direction.items() if synthetic.MOTION_TEXT[word] in caption)
        assert np.dot(move, expected) > 15 and abs(np.dot(move, expected[::-1])) < 5
        checked += 1
    assert checked >= 3


def test_prepare_synthetic_is_idempotent(tmp_path):
    kw = dict(num_train=8, num_eval=4, image_size=32, vocab_size=64)
    res = synthetic.prepare_synthetic(str(tmp_path), **kw)
    assert Tokenizer.from_path(res["tokenizer"]).base_vocab_size == 64  # Exactly as asked.
    assert res["reports"]["ltip"] == {
        "eval": {"written": 4, "skipped": 0},
        "train": {"written": 8, "skipped": 0},
    }
    stamp = os.path.getmtime(os.path.join(res["data_dirs"]["ltip"], "image_text_pairs", "1.0.0"))
    assert synthetic.prepare_synthetic(str(tmp_path), **kw) == res
    assert os.path.getmtime(os.path.join(res["data_dirs"]["ltip"], "image_text_pairs", "1.0.0")) == stamp
    res2 = synthetic.prepare_synthetic(str(tmp_path), **(kw | {"num_train": 12}))  # Other params: rebuilt.
    assert res2["reports"]["ltip"]["train"]["written"] == 12
    cfg = synthetic.synthetic_data_config(str(tmp_path))
    assert cfg.tokenizer == res2["tokenizer"] and sorted(cfg.datasets) == sorted(synthetic.NAMES)
    assert {n: d.weight for n, d in cfg.datasets.items()} == synthetic.WEIGHTS
    assert not any(d.augment for d in cfg.datasets.values())
