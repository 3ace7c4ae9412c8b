"""Readers of raw, on-disk source formats. They parse and read files; the builders validate and write.

Layout: a source directory holds one sub-directory per split (`train/`, `eval/`, ...). In a split directory:

- interleaved (MMC4/OBELICS-like web documents)
  * `*.jsonl`: one document per line, either OBELICS-style
    `{"texts": [str|null...], "images": [path|null...]}` (parallel lists: position i is a text or an image)
    or MMC4-style `{"text_list": [...], "image_info": [{"image_name": path, "matched_text_index": i}, ...]}`
    (the image goes before its matched sentence).
    Image paths are relative to the JSONL file's directory.
  * `*.tar`: WebDataset shards; a sample is `KEY.json` (either style above) plus `KEY.<name>` members that the
    JSON's image entries name (`"0.jpg"` for member `KEY.0.jpg`).
- pairs (ALIGN/LTIP/LAION-like image-text)
  * `*.tar`: LAION-style WebDataset shards, `KEY.jpg|png|webp` + `KEY.txt` (or `KEY.json` with "caption").
  * `*.jsonl` / `*.csv`: rows with an image path column (`image`, `image_path`, `file_name`, `filepath`,
    `path`) and a caption column (`caption`, `text`, `TEXT`, `alt`), paths relative to the file's directory.
- video (WebVid-like video-text)
  * `*.csv`: WebVid's `videoid,...,page_dir,name` (the caption is `name`; the video is found at
    `videos/PAGE_DIR/VIDEOID.EXT`, `PAGE_DIR/VIDEOID.EXT`, `videos/VIDEOID.EXT` or `VIDEOID.EXT`) or any CSV /
    `*.jsonl` with a `video` path column and a `caption` column.
  * `*.tar`: WebDataset shards, `KEY.mp4|webm|mkv|mov|avi` + `KEY.txt` (or `.json` with "caption").

Every reader yields either a record or a `Skipped(key, reason, detail)`, so a broken line, a missing file or a
truncated shard is counted by the builder instead of stopping it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import tarfile
from collections.abc import Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
_IMAGE_COLS = ("image", "image_path", "file_name", "filepath", "path", "img")
_VIDEO_COLS = ("video", "video_path", "file_name", "filepath", "path")
_CAPTION_COLS = ("caption", "text", "TEXT", "alt", "name")
_SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass
class Skipped:
    """A source record that cannot be used, and why (a reason is a short snake_case counter name)."""

    key: str
    reason: str
    detail: str = ""


@dataclasses.dataclass
class Pair:
    key: str
    media: bytes  # Encoded image or video file bytes.
    caption: str


@dataclasses.dataclass
class Doc:
    """An interleaved document: items in reading order, each a text (str) or an image (bytes or Skipped)."""

    key: str
    items: list[str | bytes | Skipped]


# --- Directories. ------------------------------------------------------------------------------------


def check_source_dir(source_dir: str) -> None:
    """Raises a clear error naming the path if the source directory is missing or unreadable."""
    if not source_dir:
        raise ValueError("No source_dir given.")
    if not os.path.isdir(source_dir):
        raise FileNotFoundError(f"Source directory does not exist: {source_dir!r}")
    if not os.access(source_dir, os.R_OK | os.X_OK):
        raise PermissionError(f"Source directory is not readable: {source_dir!r}")


def list_splits(source_dir: str) -> list[str]:
    """Split names: the sub-directories of `source_dir` that look like split names."""
    check_source_dir(source_dir)
    splits = sorted(
        d for d in os.listdir(source_dir) if _SPLIT_RE.match(d) and os.path.isdir(os.path.join(source_dir, d))
    )
    if not splits:
        raise FileNotFoundError(f"No split sub-directories (e.g. 'train/', 'eval/') in source directory {source_dir!r}")
    return splits


def _files(split_dir: str, exts: tuple[str, ...]) -> list[str]:
    return sorted(
        os.path.join(split_dir, f)
        for f in os.listdir(split_dir)
        if f.rsplit(".", 1)[-1].lower() in exts and os.path.isfile(os.path.join(split_dir, f))
    )


def _read(path: str, key: str) -> bytes | Skipped:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return Skipped(key, "missing_file", path)
    except OSError as e:
        return Skipped(key, "unreadable_file", f"{path}: {e}")


def _resolve(base_dir: str, rel: str) -> str:
    return rel if os.path.isabs(rel) else os.path.join(base_dir, rel)


# --- Generic file formats. ---------------------------------------------------------------------------


def iter_jsonl(path: str, rel: str) -> Iterator[tuple[str, dict | Skipped]]:
    """(key, parsed object) per non-empty line; malformed lines become Skipped('malformed_json')."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            key = f"{rel}:{lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield key, Skipped(key, "malformed_json", str(e))
                continue
            yield key, obj if isinstance(obj, dict) else Skipped(key, "malformed_json", "not a JSON object")


def iter_csv(path: str, rel: str) -> Iterator[tuple[str, dict | Skipped]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        try:
            for rowno, row in enumerate(csv.DictReader(f), 2):
                yield f"{rel}:{rowno}", row
        except csv.Error as e:
            yield f"{rel}:?", Skipped(f"{rel}:?", "malformed_csv", str(e))


def iter_tar(path: str, rel: str) -> Iterator[tuple[str, dict[str, bytes] | Skipped]]:
    """WebDataset grouping: consecutive members `DIR/KEY.EXT` with the same `DIR/KEY` form one sample.

    The extension is everything after the first dot of the basename (`abc.0.jpg` -> key `abc`, ext `0.jpg`).
    A truncated or corrupt shard yields what it could read, then one Skipped('corrupt_tar').
    """
    cur_key, cur = None, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = os.path.split(member.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                key = f"{rel}:{os.path.join(dirname, stem)}"
                if key != cur_key and cur_key is not None:
                    yield cur_key, cur
                    cur = {}
                cur_key = key
                f = tar.extractfile(member)
                cur[ext.lower()] = f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        if cur_key is not None:  # The last sample may be incomplete: drop it rather than risk a wrong pairing.
            yield cur_key, Skipped(cur_key, "corrupt_tar", str(e))
        else:
            yield f"{rel}:?", Skipped(f"{rel}:?", "corrupt_tar", str(e))
        return
    if cur_key is not None:
        yield cur_key, cur


def _first(row: dict, cols: tuple[str, ...]) -> str | None:
    for c in cols:
        v = row.get(c)
        if isinstance(v, str) and v.strip():
            return v
    return None


def _caption_of(sample: dict[str, bytes]) -> str:
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ""
        return (_first(meta, _CAPTION_COLS) or "") if isinstance(meta, dict) else ""
    return ""


# --- Pairs (image-text and video-text). --------------------------------------------------------------


def iter_pairs(split_dir: str, media: str = "image") -> Iterator[Pair | Skipped]:
    """Image-text (media='image') or video-text (media='video') pairs of one split directory."""
    exts = IMAGE_EXTS if media == "image" else VIDEO_EXTS
    media_cols = _IMAGE_COLS if media == "image" else _VIDEO_COLS
    for path in _files(split_dir, ("tar", "jsonl", "csv")):
        rel = os.path.relpath(path, split_dir)
        base_dir = os.path.dirname(path)
        if path.endswith(".tar"):
            for key, sample in iter_tar(path, rel):
                if isinstance(sample, Skipped):
                    yield sample
                    continue
                ext = next((e for e in exts if e in sample), None)
                if ext is None:
                    yield Skipped(key, "missing_file", f"no {'/'.join(exts)} member in sample")
                else:
                    yield Pair(key, sample[ext], _caption_of(sample))
            continue
        rows = iter_jsonl(path, rel) if path.endswith(".jsonl") else iter_csv(path, rel)
        for key, row in rows:
            if isinstance(row, Skipped):
                yield row
                continue
            if media == "video" and "videoid" in row:  # WebVid results CSV.
                found = _find_webvid_video(base_dir, row)
                caption = row.get("name") or ""
                yield (
                    Pair(key, found, caption)
                    if isinstance(found, bytes)
                    else Skipped(
                        key,
                        found.reason if isinstance(found, Skipped) else "missing_file",
                        f"video {row.get('videoid')}",
                    )
                )
                continue
            rel_media = _first(row, media_cols)
            if rel_media is None:
                yield Skipped(key, "missing_file", f"no {media} path column")
                continue
            data = _read(_resolve(base_dir, rel_media), key)
            caption = _first(row, _CAPTION_COLS) or ""
            yield data if isinstance(data, Skipped) else Pair(key, data, caption)


def _find_webvid_video(base_dir: str, row: dict) -> bytes | Skipped | None:
    vid, page = str(row.get("videoid", "")).strip(), str(row.get("page_dir", "")).strip()
    if not vid:
        return None
    for sub in (os.path.join("videos", page), page, "videos", ""):
        for ext in VIDEO_EXTS:
            path = os.path.join(base_dir, sub, f"{vid}.{ext}")
            if os.path.isfile(path):
                return _read(path, vid)
    return None


# --- Interleaved documents. --------------------------------------------------------------------------


def iter_docs(split_dir: str) -> Iterator[Doc | Skipped]:
    """Interleaved documents of one split directory (JSONL + image files, or WebDataset tars)."""
    for path in _files(split_dir, ("tar", "jsonl")):
        rel = os.path.relpath(path, split_dir)
        if path.endswith(".jsonl"):
            base_dir = os.path.dirname(path)
            for key, obj in iter_jsonl(path, rel):
                if isinstance(obj, Skipped):
                    yield obj
                    continue
                yield _doc(key, obj, lambda name, key=key, d=base_dir: _read(_resolve(d, name), key))
            continue
        for key, sample in iter_tar(path, rel):
            if isinstance(sample, Skipped):
                yield sample
                continue
            try:
                obj = json.loads(sample.get("json", b""))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield Skipped(key, "malformed_json", str(e))
                continue
            if not isinstance(obj, dict):
                yield Skipped(key, "malformed_json", "not a JSON object")
                continue
            yield _doc(key, obj, lambda name, key=key, sample=sample: _member(sample, name, key))


def _member(sample: dict[str, bytes], name: str, key: str) -> bytes | Skipped:
    name = name.lower()
    stem = os.path.basename(key.split(":", 1)[-1])
    if name.startswith(stem + "."):  # Full member basename given instead of the extension part.
        name = name[len(stem) + 1 :]
    return sample[name] if name in sample else Skipped(key, "missing_file", f"member {name}")


def _doc(key: str, obj: dict, load) -> Doc | Skipped:
    """One document from OBELICS-style or MMC4-style JSON; `load(name)` reads an image."""
    items: list[str | bytes | Skipped] = []
    if "texts" in obj or "images" in obj:
        texts, images = obj.get("texts") or [], obj.get("images") or []
        if not isinstance(texts, list) or not isinstance(images, list):
            return Skipped(key, "malformed_json", "texts/images must be lists")
        for i in range(max(len(texts), len(images))):
            text = texts[i] if i < len(texts) else None
            image = images[i] if i < len(images) else None
            if isinstance(image, str) and image:
                items.append(load(image))
            if isinstance(text, str) and text.strip():
                items.append(text)
    elif "text_list" in obj:
        texts = obj.get("text_list") or []
        infos = obj.get("image_info") or []
        if not isinstance(texts, list) or not isinstance(infos, list):
            return Skipped(key, "malformed_json", "text_list/image_info must be lists")
        before: dict[int, list[str]] = {}
        for info in infos:
            if isinstance(info, dict) and isinstance(info.get("image_name"), str):
                before.setdefault(int(info.get("matched_text_index", 0) or 0), []).append(info["image_name"])
        for i in range(max(len(texts), max(before, default=-1) + 1)):
            items.extend(load(name) for name in before.get(i, []))
            if i < len(texts) and isinstance(texts[i], str) and texts[i].strip():
                items.append(texts[i])
    else:
        return Skipped(key, "malformed_json", "neither texts/images nor text_list/image_info")
    return Doc(key, items)
