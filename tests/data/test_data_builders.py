"""TFDS builders on generated sources with broken records mixed in; source readers; restartable builds."""

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from flamingo_jax.data import builders, faults, sources, synthetic

NUM_TRAIN, NUM_EVAL = 16, 8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    src = synthetic.write_sources(
        str(root / "src"), seed=1, num_train=NUM_TRAIN, num_eval=NUM_EVAL, image_size=32, vocab_size=128
    )
    expected = faults.add_broken_records(str(root / "src"))
    reports = {name: builders.build(kind, src[name], str(root / name)) for name, kind in synthetic.KIND_OF.items()}
    return root, src, expected, reports


@pytest.mark.parametrize("name", synthetic.NAMES)
def test_written_and_skipped_counts(built, name):
    root, _, expected, reports = built
    report = reports[name]
    clean = synthetic.counts(NUM_TRAIN)[name]
    train = report["splits"]["train"]
    assert train["written"] == clean + expected[name]["written"]
    assert train["skipped_by_reason"] == expected[name]["skipped"]
    assert train["skipped"] == sum(expected[name]["skipped"].values())
    assert train.get("images_dropped_by_reason", {}) == expected[name].get("images_dropped", {})
    assert len(train["skipped_examples"]) == train["skipped"]  # Keys and reasons, for debugging.
    assert report["splits"]["eval"] == {
        "written": synthetic.counts(NUM_EVAL)[name],
        "skipped": 0,
        "skipped_by_reason": {},
        "skipped_examples": [],
    }
    # The data holds exactly the written records, and the report is saved beside it.
    builder = builders.open_builder(synthetic.KIND_OF[name], str(root / name))
    assert len(builder.as_data_source("train")) == train["written"]
    assert builders.load_report(synthetic.KIND_OF[name], str(root / name))["splits"] == report["splits"]


def test_records_hold_valid_media(built):
    root, *_ = built
    from flamingo_jax.data import preprocess

    rec = builders.open_builder("pairs", str(root / "ltip")).as_data_source("eval")[0]
    assert preprocess.decode_image(rec["image"]).shape == (32, 32, 3) and rec["caption"]
    vid = builders.open_builder("video", str(root / "vtp")).as_data_source("eval")[0]
    assert 8 <= vid["duration"] <= 12 and vid["num_frames"] == 2 * round(float(vid["duration"]))
    doc = builders.open_builder("interleaved", str(root / "m3w")).as_data_source("eval")[0]
    assert sum(doc["is_image"]) == len(doc["images"]) >= 1
    assert len(doc["is_image"]) - sum(doc["is_image"]) == len(doc["texts"])


def test_rebuild_is_reused(built):
    root, src, _, reports = built
    again = builders.build("pairs", src["ltip"], str(root / "ltip"))
    assert again["reused"] and not reports["ltip"]["reused"]
    assert again["splits"] == reports["ltip"]["splits"]


def test_interrupted_build_restarts_cleanly(built, tmp_path, monkeypatch):
    _, src, _, reports = built
    data_dir = str(tmp_path / "ltip")
    calls = {"n": 0}
    real = builders.ImageTextPairs._example

    def crash_after_some(self, rec, stats):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash")
        return real(self, rec, stats)

    monkeypatch.setattr(builders.ImageTextPairs, "_example", crash_after_some)
    with pytest.raises(KeyboardInterrupt):
        builders.build("pairs", src["ltip"], data_dir)
    monkeypatch.setattr(builders.ImageTextPairs, "_example", real)
    # A kill -9 would also leave TFDS's temporary directory behind: simulate that too.
    os.makedirs(os.path.join(data_dir, "image_text_pairs", "incomplete.ABC123_1.0.0"), exist_ok=True)
    assert not builders.ImageTextPairs(data_dir=data_dir).is_prepared()
    report = builders.build("pairs", src["ltip"], data_dir)
    assert not report["reused"] and report["splits"] == reports["ltip"]["splits"]
    assert sorted(os.listdir(os.path.join(data_dir, "image_text_pairs"))) == ["1.0.0"]


def test_missing_source_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        builders.build("pairs", str(tmp_path / "no_such_dir"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        builders.build("pairs", str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="not_built"):
        builders.open_builder("pairs", str(tmp_path / "not_built"))
    with pytest.raises(ValueError, match="kind"):
        builders.build("audio", str(tmp_path), str(tmp_path / "out"))


def test_split_with_only_broken_records_is_an_error(tmp_path):
    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "train" / "x.jsonl").write_text('{"image": "missing.png", "caption": "hi"}\n')
    with pytest.raises(ValueError, match="no valid records"):
        builders.build("pairs", str(tmp_path / "src"), str(tmp_path / "out"))


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_interleaved_webdataset_and_mmc4_sources(built, tmp_path):
    root, *_ = built
    img = sorted((root / "src" / "ltip" / "train" / "images").glob("*.png"))[0].read_bytes()
    split = tmp_path / "src" / "train"
    split.mkdir(parents=True)
    obelics = {"texts": ["intro.", None, "after."], "images": [None, "0.png", None]}
    _tar(split / "00000.tar", [("d1.json", json.dumps(obelics).encode()), ("d1.0.png", img)])
    (split / "images").mkdir()
    (split / "images" / "a.png").write_bytes(img)
    mmc4 = {
        "text_list": ["first sentence.", "second sentence."],
        "image_info": [{"image_name": "images/a.png", "matched_text_index": 1}],
    }
    (split / "docs.jsonl").write_text(json.dumps(mmc4) + "\n")
    docs = list(sources.iter_docs(str(split)))
    kinds = [[type(x).__name__ for x in d.items] for d in docs]
    assert kinds == [["str", "bytes", "str"], ["str", "bytes", "str"]]  # The tar's doc, then the JSONL's.
    assert docs[0].items[0] == "intro." and docs[1].items[2] == "second sentence."
    report = builders.build("interleaved", str(tmp_path / "src"), str(tmp_path / "out"))
    assert report["splits"]["train"]["written"] == 2


def test_pairs_csv_and_video_jsonl_sources(built, tmp_path):
    root, *_ = built
    split = tmp_path / "train"
    split.mkdir()
    shutil.copytree(root / "src" / "ltip" / "train" / "images", split / "imgs")
    name = sorted(os.listdir(split / "imgs"))[0]
    (split / "pairs.csv").write_text(f"filepath,caption\nimgs/{name},a caption\nimgs/nope.png,x\n")
    recs = list(sources.iter_pairs(str(split), "image"))
    assert isinstance(recs[0], sources.Pair) and recs[0].caption == "a caption"
    assert isinstance(recs[1], sources.Skipped) and recs[1].reason == "missing_file"
    video = next((root / "src" / "vtp" / "train" / "videos").rglob("*.mp4"))
    split = tmp_path / "video"
    split.mkdir()
    (split / "v.jsonl").write_text(json.dumps({"video": str(video), "caption": "moves"}) + "\n")
    recs = list(sources.iter_pairs(str(split), "video"))
    assert len(recs) == 1 and recs[0].caption == "moves" and len(recs[0].media) > 100


def test_synthetic_video_is_decodable_at_1fps(built):
    from flamingo_jax.data import preprocess

    root, *_ = built
    data = next((root / "src" / "vtp" / "train" / "videos").rglob("*.mp4")).read_bytes()
    duration, _ = preprocess.probe_video(data)
    frames = preprocess.decode_video(data, 8, 1.0, np.random.default_rng(0), duration)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
