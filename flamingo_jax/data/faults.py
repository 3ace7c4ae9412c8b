"""Deliberately broken source records, mixed into a synthetic source tree to test bad-input handling.

    expected = add_broken_records(src_root)   # src_root as written by synthetic.write_sources
    report = builders.build("pairs", f"{src_root}/ltip", data_dir)
    assert report["splits"]["train"]["skipped_by_reason"] == expected["ltip"]["skipped"]

Each dataset gets, in its `train` split and in its own source format, one or more records of every kind of
breakage its builder must survive (malformed JSON, missing file, empty caption, corrupt or truncated media,
truncated tar shard), plus a few good records written beside them; the returned dict says what the build
report must count.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import tarfile

import numpy as np


def _garbage(n: int = 300) -> bytes:
    return np.random.default_rng(123).integers(0, 256, n, dtype=np.uint8).tobytes()


def _one(pattern: str) -> bytes:
    with open(sorted(glob.glob(pattern))[0], "rb") as f:
        return f.read()


def _put(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _m3w(split_dir: str) -> dict:
    good = _one(os.path.join(split_dir, "images", "*.jpg"))
    _put(os.path.join(split_dir, "images", "broken_good.jpg"), good)
    _put(os.path.join(split_dir, "images", "broken_corrupt.jpg"), _garbage())
    docs = [
        '{"texts": ["unterminated", ',  # malformed_json
        json.dumps([1, 2]),  # malformed_json (not an object)
        json.dumps({"texts": ["only missing images.", None], "images": [None, "images/nope.jpg"]}),
        json.dumps(
            {  # Written: the corrupt image is dropped, the good one kept.
                "texts": ["a document.", None, None, "with text after."],
                "images": [None, "images/broken_corrupt.jpg", "images/broken_good.jpg", None],
            }
        ),
        json.dumps({"texts": [None, "   "], "images": ["images/broken_good.jpg", None]}),  # empty_text
    ]
    with open(os.path.join(split_dir, "docs-broken.jsonl"), "w") as f:
        f.write("\n".join(docs) + "\n")
    return {
        "written": 1,
        "skipped": {"empty_text": 1, "malformed_json": 2, "no_valid_images": 1},
        "images_dropped": {"corrupt_image": 1, "missing_file": 1},
    }


def _ltip(split_dir: str) -> dict:
    good = _one(os.path.join(split_dir, "images", "*.png"))
    _put(os.path.join(split_dir, "images", "broken_good.png"), good)
    _put(os.path.join(split_dir, "images", "broken_truncated.png"), good[: len(good) // 2])
    _put(os.path.join(split_dir, "images", "broken_garbage.png"), _garbage())
    rows = [
        '{"image": "images/broken_good.png", "caption": ',  # malformed_json
        json.dumps({"image": "images/does_not_exist.png", "caption": "a red circle"}),  # missing_file
        json.dumps({"image": "images/broken_good.png", "caption": "  \t "}),  # empty_caption
        json.dumps({"image": "images/broken_truncated.png", "caption": "a red circle"}),  # corrupt_image
        json.dumps({"image": "images/broken_garbage.png", "caption": "a red circle"}),  # corrupt_image
        json.dumps({"image": "images/broken_good.png", "caption": "a good one"}),  # written
    ]
    with open(os.path.join(split_dir, "broken.jsonl"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return {
        "written": 1,
        "skipped": {"corrupt_image": 2, "empty_caption": 1, "malformed_json": 1, "missing_file": 1},
    }


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _align(split_dir: str) -> dict:
    with tarfile.open(sorted(glob.glob(os.path.join(split_dir, "*.tar")))[0]) as tar:
        good = next(tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg"))
    _put(
        os.path.join(split_dir, "broken-a.tar"),
        _tar_bytes(
            [
                ("b0.jpg", _garbage()),  # corrupt_image
                ("b0.txt", b"a red circle"),
                ("b1.txt", b"no image in this sample"),  # missing_file
                ("b2.jpg", good),  # empty_caption
                ("b2.txt", b"   "),
                ("b3.jpg", good),  # written
                ("b3.txt", b"a good one"),
            ]
        ),
    )
    # A shard cut off inside its third sample: the two complete samples are written, the rest counted.
    members = [(f"t{i}.{ext}", good if ext == "jpg" else b"fine") for i in range(3) for ext in ("jpg", "txt")]
    full = _tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(full)) as tar:
        cut = next(m.offset_data for m in tar if m.name == "t2.jpg") + 100
    _put(os.path.join(split_dir, "broken-b.tar"), full[:cut])
    return {
        "written": 3,
        "skipped": {"corrupt_image": 1, "corrupt_tar": 1, "empty_caption": 1, "missing_file": 1},
    }


def _vtp(split_dir: str) -> dict:
    good = _one(os.path.join(split_dir, "videos", "*", "*.mp4"))
    page = "broken"
    _put(os.path.join(split_dir, "videos", page, "9000001.mp4"), _garbage(2000))  # corrupt_video
    _put(os.path.join(split_dir, "videos", page, "9000002.mp4"), good[: len(good) // 3])  # corrupt_video
    _put(os.path.join(split_dir, "videos", page, "9000003.mp4"), good)  # empty caption
    _put(os.path.join(split_dir, "videos", page, "9000004.mp4"), good)  # written
    with open(os.path.join(split_dir, "broken.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writerow(["9000000", "", "PT00H00M10S", page, "a missing video"])  # missing_file
        w.writerow(["9000001", "", "PT00H00M10S", page, "a garbage video"])
        w.writerow(["9000002", "", "PT00H00M10S", page, "a truncated video"])
        w.writerow(["9000003", "", "PT00H00M10S", page, ""])
        w.writerow(["9000004", "", "PT00H00M10S", page, "a good video"])
    return {"written": 1, "skipped": {"corrupt_video": 2, "empty_caption": 1, "missing_file": 1}}


def add_broken_records(src_root: str, split: str = "train") -> dict[str, dict]:
    """Adds broken records to src_root/{m3w,ltip,align,vtp}/SPLIT; returns what each build must count.

    Per dataset: {"written": good records added, "skipped": {reason: n}, ["images_dropped": {reason: n}]}.
    """
    adders = {"m3w": _m3w, "ltip": _ltip, "align": _align, "vtp": _vtp}
    return {name: add(os.path.join(src_root, name, split)) for name, add in adders.items()}
