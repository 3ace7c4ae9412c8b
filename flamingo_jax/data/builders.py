"""TFDS builders (one per kind) that turn a local source directory into ArrayRecord files.

    report = build("pairs", source_dir="/data/laion_src", data_dir="/data/laion")
    # -> /data/laion/image_text_pairs/1.0.0/{*.array_record-*, dataset_info.json, build_report.json}

No downloads: `source_dir` holds one sub-directory per split in the formats that `sources.py` reads. Every
record is validated (media decoded once, captions checked) and either written or skipped with a reason; the
counts go to `build_report.json` beside the data. Media stay encoded in the records (images as their file
bytes, videos as their container bytes) and are decoded by the loader, so resolution and frame rate are
loader settings.

Restartable: TFDS writes into a temporary directory that is renamed only when every split is complete (and
the report, written inside it, is part of that rename), so an interrupted build leaves no half dataset; the
next `build` deletes leftovers and starts over, and a `build` of a complete dataset returns its report
without touching it. Run one build per data_dir at a time (in multi-host jobs: process 0, then a barrier).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from flamingo_jax.data import preprocess, sources
from flamingo_jax.data.sources import Doc, Pair, Skipped

REPORT_FILE = "build_report.json"
_MAX_EXAMPLES_IN_REPORT = 20


def _bytes_feature() -> tfds.features.Tensor:
    # A scalar bytes tensor: stored as is, no TensorFlow needed to encode or decode (unlike features.Image).
    return tfds.features.Tensor(shape=(), dtype=np.object_)


def _clean_text(text: str) -> str:
    return " ".join(text.split())


class _SplitStats:
    """Counters of one split, for the build report."""

    def __init__(self):
        self.written = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.images_dropped: collections.Counter[str] = collections.Counter()
        self.examples: list[list[str]] = []

    def skip(self, rec: Skipped) -> None:
        self.skipped[rec.reason] += 1
        if len(self.examples) < _MAX_EXAMPLES_IN_REPORT:
            self.examples.append([rec.key, rec.reason, rec.detail[:200]])

    def as_dict(self) -> dict[str, Any]:
        out = {
            "written": self.written,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "skipped_examples": self.examples,
        }
        if self.images_dropped:
            out["images_dropped_by_reason"] = dict(sorted(self.images_dropped.items()))
        return out


class _SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared logic: splits from the source directory, de-duplication, skip accounting, report."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    KIND: ClassVar[str] = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup needs the `importlib_resources` backport, which this project does not install.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, source_dir: str | None = None, **kwargs):
        self.source_dir = os.fspath(source_dir) if source_dir else None
        self._stats: dict[str, _SplitStats] = {}
        self._t0 = time.time()
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self.source_dir:
            raise ValueError(f"{self.name}: no source_dir given, cannot build {self.data_dir!r}.")
        return {split: self._generate_examples(split) for split in sources.list_splits(self.source_dir)}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        stats = self._stats[split] = _SplitStats()
        seen: set[str] = set()
        for rec in self._records(os.path.join(self.source_dir, split)):
            if not isinstance(rec, Skipped):
                rec = self._example(rec, stats)
            if not isinstance(rec, Skipped) and rec[0] in seen:
                rec = Skipped(rec[0], "duplicate_key")
            if isinstance(rec, Skipped):
                stats.skip(rec)
                continue
            seen.add(rec[0])
            stats.written += 1
            yield rec
        if not stats.written:
            raise ValueError(
                f"{self.name}: split {split!r} of {self.source_dir!r} has no valid records "
                f"(skipped: {dict(stats.skipped)})."
            )

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        # self.data_dir is still the temporary directory here, so the report is renamed with the data.
        report = {
            "builder": self.name,
            "version": str(self.version),
            "kind": self.KIND,
            "source_dir": os.path.abspath(self.source_dir),
            "seconds": round(time.time() - self._t0, 2),
            "splits": {k: v.as_dict() for k, v in sorted(self._stats.items())},
        }
        with open(os.path.join(self.data_dir, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)

    # Subclasses: raw source records, and validation of one record into (key, example) or Skipped.
    def _records(self, split_dir: str) -> Iterator[Any]:
        raise NotImplementedError

    def _example(self, rec: Any, stats: _SplitStats) -> tuple[str, dict[str, Any]] | Skipped:
        raise NotImplementedError


class InterleavedDocs(_SourceBuilder):
    """M3W-like web documents: texts and encoded images in reading order."""

    KIND = "interleaved"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Interleaved image-text documents; `is_image[i]` says whether item i is the next of "
            "`images` (encoded bytes) or of `texts`.",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "texts": tfds.features.Sequence(tfds.features.Text()),
                    "images": tfds.features.Sequence(_bytes_feature()),
                    "is_image": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.bool_)),
                }
            ),
        )

    def _records(self, split_dir):
        return sources.iter_docs(split_dir)

    def _example(self, rec: Doc, stats):
        texts, images, is_image = [], [], []
        for item in rec.items:
            if isinstance(item, str):
                text = _clean_text(item)
                if text:
                    texts.append(text)
                    is_image.append(False)
                continue
            if isinstance(item, Skipped):
                stats.images_dropped[item.reason] += 1
                continue
            try:
                preprocess.decode_image(item)
            except preprocess.MediaError:
                stats.images_dropped["corrupt_image"] += 1
                continue
            images.append(item)
            is_image.append(True)
        if not images:
            return Skipped(rec.key, "no_valid_images")
        if not texts:
            return Skipped(rec.key, "empty_text")
        return rec.key, {"id": rec.key, "texts": texts, "images": images, "is_image": is_image}


class ImageTextPairs(_SourceBuilder):
    """ALIGN/LTIP/LAION-like image-text pairs: encoded image bytes and a caption."""

    KIND = "pairs"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-text pairs (encoded image bytes + caption).",
            features=tfds.features.FeaturesDict(
                {"id": tfds.features.Text(), "image": _bytes_feature(), "caption": tfds.features.Text()}
            ),
        )

    def _records(self, split_dir):
        return sources.iter_pairs(split_dir, "image")

    def _example(self, rec: Pair, stats):
        caption = _clean_text(rec.caption)
        if not caption:
            return Skipped(rec.key, "empty_caption")
        try:
            preprocess.decode_image(rec.media)
        except preprocess.MediaError as e:
            return Skipped(rec.key, "corrupt_image", str(e))
        return rec.key, {"id": rec.key, "image": rec.media, "caption": caption}


class VideoTextPairs(_SourceBuilder):
    """VTP/WebVid-like video-text pairs: the video file's bytes, its caption, duration and frame count."""

    KIND = "video"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Video-text pairs (encoded video container bytes + caption).",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "video": _bytes_feature(),
                    "caption": tfds.features.Text(),
                    "duration": tfds.features.Tensor(shape=(), dtype=np.float32),
                    "num_frames": tfds.features.Tensor(shape=(), dtype=np.int32),
                }
            ),
        )

    def _records(self, split_dir):
        return sources.iter_pairs(split_dir, "video")

    def _example(self, rec: Pair, stats):
        caption = _clean_text(rec.caption)
        if not caption:
            return Skipped(rec.key, "empty_caption")
        try:
            duration, num_frames = preprocess.probe_video(rec.media)
        except preprocess.MediaError as e:
            return Skipped(rec.key, "corrupt_video", str(e))
        return rec.key, {
            "id": rec.key,
            "video": rec.media,
            "caption": caption,
            "duration": np.float32(duration),
            "num_frames": np.int32(num_frames),
        }


BUILDERS: dict[str, type[_SourceBuilder]] = {
    "interleaved": InterleavedDocs,
    "pairs": ImageTextPairs,
    "video": VideoTextPairs,
}


class _NoMissingVariantWarning(logging.Filter):
    """Drops TFDS's "Variant folder ... has no dataset_info.json", logged whenever a build starts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Variant folder")


@contextlib.contextmanager
def _quiet_tfds():
    flt, logger = _NoMissingVariantWarning(), logging.getLogger("absl")
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def _builder_cls(kind: str) -> type[_SourceBuilder]:
    if kind not in BUILDERS:
        raise ValueError(f"Unknown dataset kind {kind!r}; expected one of {sorted(BUILDERS)}.")
    return BUILDERS[kind]


def build(kind: str, source_dir: str, data_dir: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Builds `kind` data from `source_dir` into `data_dir` (reused if complete); returns the build report."""
    cls = _builder_cls(kind)
    sources.check_source_dir(source_dir)
    data_dir = os.fspath(data_dir)
    if overwrite:
        shutil.rmtree(os.path.join(data_dir, cls.name), ignore_errors=True)
    with _quiet_tfds():
        builder = cls(source_dir=source_dir, data_dir=data_dir, file_format="array_record")
        prepared = builder.is_prepared()
    if prepared:
        report = load_report(kind, data_dir)
        report["reused"] = True
        return report
    # A build killed outright (no Python cleanup) leaves its temporary directory: start over without it.
    for leftover in glob.glob(os.path.join(data_dir, cls.name, "*incomplete*")):
        shutil.rmtree(leftover, ignore_errors=True)
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, ".tfds_downloads"),  # Unused (no downloads), kept out of the way.
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    report = load_report(kind, data_dir)
    report["reused"] = False
    return report


def load_report(kind: str, data_dir: str) -> dict[str, Any]:
    """The build report of a built dataset."""
    path = os.path.join(data_dir, _builder_cls(kind).name, str(_builder_cls(kind).VERSION), REPORT_FILE)
    with open(path) as f:
        return json.load(f)


def open_builder(kind: str, data_dir: str) -> _SourceBuilder:
    """A read-only builder of a prepared dataset; a clear error naming the path if there is none."""
    cls = _builder_cls(kind)
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"Data directory does not exist: {data_dir!r} (build it with "
            f"flamingo_jax.data.builders.build({kind!r}, SOURCE_DIR, {data_dir!r}))."
        )
    with _quiet_tfds():
        builder = cls(data_dir=data_dir)
        prepared = builder.is_prepared()
    if not prepared:
        raise FileNotFoundError(f"No prepared {cls.name} dataset (kind {kind!r}) under {data_dir!r}.")
    return builder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build ArrayRecord data from a local source directory.")
    parser.add_argument("--kind", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--source_dir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    report = build(args.kind, args.source_dir, args.data_dir, overwrite=args.overwrite)
    print(
        json.dumps(
            {k: v for k, v in report.items() if k != "splits"}
            | {
                "splits": {
                    s: {k: v for k, v in d.items() if k != "skipped_examples"} for s, d in report["splits"].items()
                }
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
