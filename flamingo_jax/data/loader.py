"""Grain loaders: ArrayRecord (TFDS) -> decoded, tokenized, batched numpy examples for the trainer.

One loader per dataset of the mixture (the trainer accumulates gradients over datasets, so each has its own
batch). A batch is a dict of numpy arrays with leading dim B = per-host batch size:

    media      uint8   [B, max_media, frames, S, S, 3]   empty slots all zero
    media_mask bool    [B, max_media]                    True for real media, in `<image>` order
    tokens     int32   [B, seq_len]                      inputs, pad_id padded
    targets    int32   [B, seq_len]                      next tokens
    loss_mask  float32 [B, seq_len]                      0 on padding targets and `<image>` targets
    link_next  bool    [B]                               text linked to the next image (M3W, p_next)

The contrastive stage (`stage='contrastive'`, pairs only) reads the same records into a text encoder's input:

    media      uint8   [B, 1, 1, S, S, 3]
    text       int32   [B, seq_len]                      `[bos] caption [eos]`, zero padded
    text_mask  bool    [B, seq_len]
    row_mask   float32 [B]                               0 for a record that failed to decode

Determinism: the sampler's global index fixes both the record and its random stream (crop, flip, window,
link_next), so a restored iterator state replays exactly, in any process. B is the number of this host's rows
of the global batch (`rows`, see global_batches.py); all of it on a single host.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain.python as grain
import ml_collections
import numpy as np
from absl import flags

from flamingo_jax.data import builders, examples, preprocess
from flamingo_jax.data.global_batches import GlobalBatchSampler
from flamingo_jax.data.tokenizer import Tokenizer

KINDS = ("interleaved", "pairs", "video")
STAGES = ("flamingo", "contrastive")


def default_dataset_config(kind: str) -> ml_collections.ConfigDict:
    """Per-dataset settings with their defaults (the paper's values for each kind)."""
    if kind not in KINDS:
        raise ValueError(f"Unknown dataset kind {kind!r}; expected one of {KINDS}.")
    interleaved, video = kind == "interleaved", kind == "video"
    return ml_collections.ConfigDict(
        {
            "kind": kind,
            "data_dir": "",  # Builder output (ArrayRecord TFDS data dir).
            "source_dir": "",  # Raw source (see sources.py); only used to build data_dir.
            "train_split": "train",
            "eval_split": "eval",
            "weight": 1.0,  # lambda_m of the loss.
            "batch_size": 8,  # Global batch size; each host reads its devices' rows of it (data.host_rows).
            "seq_len": 256 if interleaved else 32,
            "max_media": 5 if interleaved else 1,
            "frames": 8 if video else 1,
            "eval_frames": 0,  # Frames when train=False (the paper: 30 for video); 0 means `frames`.
            "fps": 1.0,  # Video frame sampling rate.
            "p_next": 0.5 if interleaved else 0.0,
            "augment": True,  # Random flips + colour jitter (training only).
            "flip_prob": 0.5,
            "color_jitter": 0.1,  # Max relative change of brightness, contrast, saturation.
            "resize": "pad",  # 'pad' (aspect kept, zero padded) or 'random_crop' (centre crop in eval).
            "crop_max_scale": 1.15,  # random_crop: shorter side resized to S * U[1, crop_max_scale].
            # Prepend BOS. None: as the tokenizer's own files say (LLaMA's prepend it, Qwen2's and GPT-2's don't).
            "add_bos": None,
            "read_threads": 4,  # Grain record-reading threads per process.
            "prefetch_buffer_size": 64,
            "worker_buffer_size": 2,  # Batches each worker process prepares ahead.
            "prefetch_batches": 2,  # Batches a background thread prepares ahead (0: in next()).
        }
    )


def with_defaults(ds_cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`ds_cfg` with every field that it does not set taken from default_dataset_config(ds_cfg.kind)."""
    cfg = default_dataset_config(ds_cfg["kind"])
    for key, value in dict(ds_cfg).items():
        if key in cfg:
            cfg[key] = value
        else:
            with cfg.unlocked():
                cfg[key] = value
    return cfg


class ToExample(grain.RandomMapTransform):
    """A stored record -> one example (see module docstring), plus `_valid` (False: undecodable media)."""

    def __init__(
        self, cfg: ml_collections.ConfigDict, tok: Tokenizer, image_size: int, train: bool, stage: str = "flamingo"
    ):
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r}; choose one of {STAGES}")
        if stage == "contrastive" and cfg.kind != "pairs":
            raise ValueError(f"the contrastive stage reads image-text pairs, not {cfg.kind!r} data")
        self.stage = stage
        self.kind, self.tok, self.size, self.train = cfg.kind, tok, int(image_size), bool(train)
        self.seq_len, self.max_media, self.frames = int(cfg.seq_len), int(cfg.max_media), int(cfg.frames)
        self.fps, self.p_next = float(cfg.fps), float(cfg.p_next)
        self.add_bos = tok.adds_bos if cfg.add_bos is None else bool(cfg.add_bos)
        self.prep = {
            "resize": cfg.resize,
            "augment_": bool(cfg.augment),
            "flip_prob": float(cfg.flip_prob),
            "color_jitter": float(cfg.color_jitter),
            "crop_max_scale": float(cfg.crop_max_scale),
        }

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        media_rng = rng if self.train else None  # Evaluation: centre crops, no augmentation, centred clips.
        if self.stage == "contrastive":
            return self._pair(element, media_rng)
        media = np.zeros((self.max_media, self.frames, self.size, self.size, 3), np.uint8)
        link_next = False
        try:
            if self.kind == "interleaved":
                texts = [t.decode("utf-8") for t in element["texts"]]
                ids, image_of = examples.document_ids(
                    texts, [bool(x) for x in element["is_image"]], self.tok, self.add_bos
                )
                ids, images = examples.window(ids, image_of, self.seq_len, self.max_media, self.tok, media_rng)
                for slot, idx in enumerate(images):
                    media[slot] = self._image(element["images"][idx], media_rng)
                link_next = bool(rng.random() < self.p_next)
            else:
                caption = element["caption"].decode("utf-8")
                ids = examples.caption_ids(caption, self.seq_len, self.tok, self.add_bos)
                images = [0]
                if self.kind == "video":
                    frames = preprocess.decode_video(
                        element["video"], self.frames, self.fps, media_rng, float(element["duration"])
                    )
                    media[0] = preprocess.preprocess_frames(frames, self.size, rng=media_rng, **self.prep)
                else:
                    media[0] = self._image(element["image"], media_rng)
        except preprocess.MediaError:
            # Storage corruption after a validated build: emit a row that contributes nothing, and count it.
            return self._invalid()
        out = examples.pack(ids, self.seq_len, self.tok)
        out["media"] = media
        out["media_mask"] = np.arange(self.max_media) < len(images)
        out["link_next"] = np.bool_(link_next)
        out["_valid"] = np.bool_(True)
        return out

    def _pair(self, element: dict[str, Any], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        text, mask = examples.text_ids(element["caption"].decode("utf-8"), self.seq_len, self.tok)
        media = np.zeros((1, 1, self.size, self.size, 3), np.uint8)
        try:
            media[0] = self._image(element["image"], rng)[:1]
            valid = True
        except preprocess.MediaError:
            valid = False  # counted; the row is neither a positive nor a negative (row_mask 0)
        return {
            "media": media,
            "text": text,
            "text_mask": mask,
            "row_mask": np.float32(valid),
            "_valid": np.bool_(valid),
        }

    def _image(self, data: bytes, rng: np.random.Generator | None) -> np.ndarray:
        img = preprocess.decode_image(data)[None]
        img = preprocess.preprocess_frames(img, self.size, rng=rng, **self.prep)
        return np.broadcast_to(img, (self.frames, *img.shape[1:]))  # One image = a video of one frame.

    def _invalid(self) -> dict[str, np.ndarray]:
        out = examples.pack([], self.seq_len, self.tok)
        out["media"] = np.zeros((self.max_media, self.frames, self.size, self.size, 3), np.uint8)
        out["media_mask"] = np.zeros(self.max_media, bool)
        out["link_next"] = np.bool_(False)
        out["_valid"] = np.bool_(False)
        return out


class LoaderIterator:
    """A Grain DataLoader iterator plus a prefetch thread, load-time counters and a check on every batch.

    `get_state()` returns JSON bytes (Grain's own state and the counters) and `set_state()` restores them,
    also in a fresh process, so that the following batches are exactly the ones the saved iterator would
    have given. It also quacks like Grain's iterator for `grain.python.PyGrainCheckpointHandler`.

    With prefetch > 0 a background thread prepares that many batches ahead (decoding releases the GIL, so
    this overlaps input with the train step even without worker processes). Each prefetched batch carries the
    Grain state right after it, and get_state() reports the state after the last batch *returned*, so the
    batches still in the queue are produced again after a restore, not lost.
    """

    def __init__(
        self,
        loader: grain.DataLoader,
        *,
        name: str,
        image_id: int,
        num_records: int,
        prefetch: int = 0,
        sampler: GlobalBatchSampler | None = None,
    ):
        self.name = name
        self._sampler = sampler  # Rebuilds a state saved by another host/process count (set_state).
        self.num_records = num_records  # Records this host reads in one epoch of the split.
        self._image_id = image_id
        self._it = iter(loader)
        self._prefetch = int(prefetch)
        self._grain_state = self._it.get_state()  # After the last batch returned by __next__.
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._done: BaseException | None = None
        self.skipped = 0  # Records that failed to decode at load time (emitted fully masked).
        self.batches = 0
        self.wait_s = 0.0  # Time spent blocked in next(): the trainer's input-wait metric.

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done is not None:
            raise self._done
        t0 = time.perf_counter()
        if self._prefetch > 0:
            if self._thread is None:
                self._start()
            batch, state, err = self._queue.get()
            if err is not None:
                self._done = err
                self._stop_thread()
                raise err
        else:
            batch = next(self._it)
            state = None
        self.wait_s += time.perf_counter() - t0
        self._grain_state = state
        batch = dict(batch)
        valid = np.asarray(batch.pop("_valid"))
        self.skipped += int(np.sum(~valid))
        self.batches += 1
        n_img = np.sum(batch["tokens"] == self._image_id, axis=1) if "tokens" in batch else None
        if n_img is not None and not np.array_equal(n_img, np.sum(batch["media_mask"], axis=1)):
            raise RuntimeError(f"{self.name}: <image> tokens {n_img} do not match media_mask (a bug).")
        return batch

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._thread = threading.Thread(
            target=self._produce, args=(self._queue, self._stop), name=f"prefetch-{self.name}", daemon=True
        )
        self._thread.start()

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (next(self._it), self._it.get_state(), None)
            except BaseException as e:  # Includes StopIteration: handed to the consumer, raised there.
                item = (None, None, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()  # Finishes the batch in progress; the Grain iterator is then ours again.
            self._thread, self._queue = None, None

    @property
    def metrics(self) -> dict[str, float]:
        return {"skipped": self.skipped, "batches": self.batches, "wait_s": self.wait_s}

    def get_state(self) -> bytes:
        grain_state = self._grain_state if self._grain_state is not None else self._it.get_state()
        return json.dumps({"grain": grain_state.decode(), "skipped": self.skipped, "batches": self.batches}).encode()

    def set_state(self, state: bytes | str) -> None:
        state = json.loads(state)
        self._stop_thread()  # Prefetched batches belong to the old position: dropped, and made again.
        grain_state = state["grain"]
        if self._sampler is not None:
            grain_state = self._sampler.adapt_state(grain_state, int(state["batches"]))
        self._grain_state = grain_state.encode()
        self._it.set_state(self._grain_state)
        self.skipped, self.batches = int(state["skipped"]), int(state["batches"])
        self._done = None

    def start_prefetch(self) -> None:
        """For PyGrainCheckpointHandler.restore; the prefetch thread starts on the first next() anyway."""

    def close(self) -> None:
        """Stops the prefetch thread and drops the Grain iterator (its worker processes and the shared
        memory of batches in flight); the iterator cannot be used afterwards."""
        self._stop_thread()
        self._it = None
        self._done = RuntimeError(f"{self.name}: iterator closed")


def make_loader(
    ds_cfg: Mapping[str, Any],
    *,
    split: str,
    tokenizer: Tokenizer,
    batch_size: int,
    image_size: int,
    seed: int,
    train: bool,
    rows: Sequence[int] | None = None,
    num_epochs: int | None = None,
    worker_count: int = 0,
    stage: str = "flamingo",
) -> LoaderIterator:
    """A batched iterator over this host's rows of one split of one dataset.

    Training (train=True): globally shuffled by `seed`, repeated forever unless num_epochs is given, with
    augmentation. Evaluation: file order, one pass (num_epochs=1 by default), deterministic preprocessing.
    `batch_size` is the global batch size; the host reads `rows` (sorted; default all: a single host) of every
    global batch (global_batches.GlobalBatchSampler), e.g. `host_rows.batch_rows(mesh, rules, batch_size)`. Global
    batch t is the same for any process count and mesh, so losses match across topologies and a checkpoint
    resumes on another layout. A pass reads floor(N / batch_size) whole global batches (all hosts run equally
    many steps). `stage`: 'flamingo' (module docstring) or 'contrastive' (pairs for a text encoder).
    """
    cfg = with_defaults(ds_cfg)
    if not train and cfg.eval_frames:
        cfg.frames = int(cfg.eval_frames)
    builder = builders.open_builder(cfg.kind, cfg.data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"Split {split!r} not in {cfg.data_dir!r} (has {sorted(builder.info.splits)}).")
    source = builder.as_data_source(split)
    if not train and num_epochs is None:
        num_epochs = 1
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # Grain workers read absl flags; a library caller may not have parsed them.
        flags.FLAGS.mark_as_parsed()
    sampler = GlobalBatchSampler(
        len(source),
        global_batch_size=batch_size,
        rows=rows,
        worker_count=worker_count,
        shuffle=train,
        num_epochs=num_epochs,
        seed=int(seed) % 2**31,
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            ToExample(cfg, tokenizer, image_size, train, stage),
            grain.Batch(sampler.host_batch_size, drop_remainder=True),
        ],
        worker_count=worker_count,
        worker_buffer_size=int(cfg.worker_buffer_size),
        shard_options=grain.NoSharding(),  # the sampler already yields only this host's records
        read_options=grain.ReadOptions(
            num_threads=int(cfg.read_threads), prefetch_buffer_size=int(cfg.prefetch_buffer_size)
        ),
    )
    return LoaderIterator(
        loader,
        name=f"{cfg.kind}:{split}",
        image_id=tokenizer.image_id,
        num_records=len(source) * sampler.host_batch_size // batch_size,
        prefetch=int(cfg.prefetch_batches),
        sampler=sampler,
    )


def dataset_seed(seed: int, name: str) -> int:
    """A per-dataset seed, so datasets of a mixture do not share shuffles and augmentation streams."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def make_mixture(
    data_cfg: ml_collections.ConfigDict,
    *,
    tokenizer: Tokenizer,
    image_size: int,
    seed: int,
    rows_for: Callable[[int], Sequence[int]] | None = None,
    batch_sizes: Mapping[str, int] | None = None,
    train: bool = True,
    num_epochs: int | None = None,
    worker_count: int | None = None,
    stage: str = "flamingo",
) -> dict[str, LoaderIterator]:
    """One loader per entry of `data_cfg.datasets` (name -> dataset config), keyed by name.

    Training split and settings by default; `make_eval_mixture` gives the evaluation variants. Each dataset's
    global batch size is its `batch_size` unless `batch_sizes` gives another; `rows_for(global_batch_size)` is
    this host's rows of such a batch (the trainer passes `host_rows.batch_rows` for its mesh; default all rows:
    a single host). `worker_count` defaults to `data_cfg.worker_count` (0 if unset).
    """
    if worker_count is None:
        worker_count = int(data_cfg.get("worker_count", 0))
    loaders = {}
    for name, ds_cfg in data_cfg.datasets.items():
        cfg = with_defaults(ds_cfg)
        bs = int((batch_sizes or {}).get(name, cfg.batch_size))
        loaders[name] = make_loader(
            cfg,
            split=cfg.train_split if train else cfg.eval_split,
            tokenizer=tokenizer,
            batch_size=bs,
            image_size=image_size,
            seed=dataset_seed(seed, name),
            train=train,
            rows=None if rows_for is None else rows_for(bs),
            num_epochs=num_epochs,
            worker_count=worker_count,
            stage=stage,
        )
    return loaders


def make_eval_mixture(
    data_cfg: ml_collections.ConfigDict,
    *,
    tokenizer: Tokenizer,
    image_size: int,
    seed: int,
    rows_for: Callable[[int], Sequence[int]] | None = None,
    batch_sizes: Mapping[str, int] | None = None,
    worker_count: int | None = None,
    stage: str = "flamingo",
) -> dict[str, LoaderIterator]:
    """One single-pass evaluation loader per dataset (each dataset's `eval_split`, no augmentation)."""
    return make_mixture(
        data_cfg,
        tokenizer=tokenizer,
        image_size=image_size,
        seed=seed,
        rows_for=rows_for,
        batch_sizes=batch_sizes,
        train=False,
        num_epochs=1,
        worker_count=worker_count,
        stage=stage,
    )


def get_state(iterators: Mapping[str, LoaderIterator]) -> dict[str, str]:
    """JSON-serialisable states of a dict of iterators (e.g. to save beside a checkpoint)."""
    return {name: it.get_state().decode() for name, it in iterators.items()}


def set_state(iterators: Mapping[str, LoaderIterator], states: Mapping[str, str | bytes]) -> None:
    """Restores the states saved by get_state; every iterator must have one."""
    missing = set(iterators) - set(states)
    if missing:
        raise KeyError(f"No saved iterator state for datasets {sorted(missing)}.")
    for name, it in iterators.items():
        it.set_state(states[name])
