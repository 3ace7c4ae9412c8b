"""The built-in synthetic dataset: coloured shapes, in the same source formats as the real data.

    python -m flamingo_jax.data.synthetic --out=DIR [--seed=0] [--num_train=2000] [--num_eval=200] \
        [--image_size=64] [--build]

writes, for each split (train, eval: held out, drawn from a different random stream):

    DIR/m3w/SPLIT/docs-00000.jsonl + images/*.jpg   interleaved, OBELICS-style {"texts": [..], "images": [..]}
    DIR/ltip/SPLIT/captions.jsonl + images/*.png    image-text pairs, JSONL + image folder (long captions)
    DIR/align/SPLIT/00000.tar ...                   LAION-style WebDataset (KEY.jpg, KEY.txt, KEY.json)
    DIR/vtp/SPLIT/results.csv + videos/PAGE/ID.mp4  WebVid-style CSV + mp4 (a few webm) videos
    DIR/tokenizer.model                             SentencePiece trained on the train text
    DIR/classify/COLOUR_SHAPE/*.png                 ImageNet-style class folders, one shape per image (32
                                                    classes), for zero-shot classification (stage 1)

Every image shows 1-3 shapes (circle, square, triangle, diamond) in 8 colours on one of the 9 cells of a 3x3
grid, and its caption says which shapes, colours, how many and where; videos show a shape moving (the caption
says which way) and maybe a still one; documents interleave images with text describing them (after the
image, or before it: "the next picture shows ..."). The background and the exact sizes are random, so a model
can only get the captions right by looking at the pixels. Flips or colour jitter would make the captions
wrong, so the synthetic configs turn augmentation off.

`prepare_synthetic(root)` writes the sources under root/sources and builds root/{m3w,ltip,align,vtp}; it is
idempotent (a complete, matching preparation is reused) and safe to call from several local processes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "pink": (245, 130, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Cells of the 3x3 grid, row-major, and how a caption says "where".
PLACES = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
NUMBERS = {2: "two", 3: "three"}
MOTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
MOTION_TEXT = {
    "right": "moves to the right",
    "left": "moves to the left",
    "up": "moves up",
    "down": "moves down",
}
ALIGN_NOISE = ("stock photo", "hd wallpaper", "free download", "vector illustration", "image")
DOC_TITLES = (
    "my drawings",
    "shapes i found today",
    "a small gallery",
    "notes from art class",
    "pictures for the quiz",
    "colours and shapes",
)
DOC_FILLERS = (
    "i like this one a lot.",
    "it took me a while to draw.",
    "what do you think?",
    "my friend made a similar one.",
    "the colours came out well.",
    "this is my favourite.",
)
AFTER = ("this picture shows", "here we see", "in this image there is", "look at this:")
NAMES = ("m3w", "ltip", "align", "vtp")
KIND_OF = {"m3w": "interleaved", "ltip": "pairs", "align": "pairs", "vtp": "video"}
WEIGHTS = {"m3w": 1.0, "ltip": 0.2, "align": 0.2, "vtp": 0.03}  # The paper's lambda_m.
_MARKER = "synthetic.json"
_FORMAT_VERSION = 3  # Bump when what is generated changes, so stale preparations are rebuilt.


# --- Scenes, captions, rendering. --------------------------------------------------------------------


@dataclasses.dataclass
class Shape:
    shape: str
    colour: str
    cell: int  # 0..8, row-major in the 3x3 grid.
    dx: float = 0.0  # Jitter of the centre within the cell, in cells.
    dy: float = 0.0
    scale: float = 0.7  # Size relative to a cell.


def random_scene(rng: np.random.Generator, max_shapes: int = 3) -> list[Shape]:
    """1..max_shapes shapes in distinct cells; sometimes repeats one (shape, colour) so counts vary."""
    n = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(9, size=n, replace=False)
    shapes = []
    for i, cell in enumerate(cells):
        if i > 0 and rng.random() < 0.35:
            shape, colour = shapes[0].shape, shapes[0].colour
        else:
            shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        dx, dy = rng.uniform(-0.1, 0.1, size=2)
        shapes.append(Shape(shape, colour, int(cell), float(dx), float(dy), float(rng.uniform(0.55, 0.8))))
    return shapes


def _groups(scene: list[Shape]) -> list[tuple[str, str, list[int]]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for s in scene:
        groups.setdefault((s.colour, s.shape), []).append(s.cell)
    return [(c, sh, sorted(cells)) for (c, sh), cells in groups.items()]


def _count(n: int, colour: str) -> str:
    return NUMBERS[n] if n > 1 else ("an" if colour[0] in "aeiou" else "a")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: list[Shape]) -> str:
    """Long caption (LTIP/M3W): what, how many, which colour and where, e.g.
    'two red circles at the top left and in the center and a blue square at the bottom'."""
    parts = []
    for colour, shape, cells in _groups(scene):
        noun = shape if len(cells) == 1 else shape + "s"
        parts.append(f"{_count(len(cells), colour)} {colour} {noun} " + " and ".join(PLACES[c] for c in cells))
    return _join(parts)


def describe_short(scene: list[Shape], rng: np.random.Generator) -> str:
    """Alt-text style caption (ALIGN): what and how many, no positions, sometimes with noise words."""
    parts = []
    for colour, shape, cells in _groups(scene):
        noun = shape if len(cells) == 1 else shape + "s"
        parts.append(f"{colour} {noun}" if len(cells) == 1 else f"{NUMBERS[len(cells)]} {colour} {noun}")
    text = ", ".join(parts)
    if rng.random() < 0.25:
        text += " " + ALIGN_NOISE[rng.integers(len(ALIGN_NOISE))]
    return text


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(x) for x in rng.integers(0, 70, size=3))


def _draw(draw: ImageDraw.ImageDraw, s: Shape, cx: float, cy: float, r: float) -> None:
    col = COLOURS[s.colour]
    if s.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif s.shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=col)
    elif s.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=col)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)


def _centre(s: Shape, size: int) -> tuple[float, float]:
    cell = size / 3
    return (s.cell % 3 + 0.5 + s.dx) * cell, (s.cell // 3 + 0.5 + s.dy) * cell


def render(
    scene: list[Shape],
    size: int,
    background: tuple[int, int, int],
    positions: list[tuple[float, float]] | None = None,
) -> np.ndarray:
    """uint8 [size, size, 3]; `positions` (pixel centres) override the cells (used for videos)."""
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(scene):
        cx, cy = positions[i] if positions else _centre(s, size)
        _draw(draw, s, cx, cy, s.scale * size / 6)
    return np.asarray(img)


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


# --- Writers (one per source format). ----------------------------------------------------------------


def _write_pairs_jsonl(split_dir: str, n: int, size: int, rng: np.random.Generator) -> Iterator[str]:
    os.makedirs(os.path.join(split_dir, "images"), exist_ok=True)
    with open(os.path.join(split_dir, "captions.jsonl"), "w") as f:
        for i in range(n):
            scene = random_scene(rng)
            rel = f"images/{i:06d}.png"
            with open(os.path.join(split_dir, rel), "wb") as img_f:
                img_f.write(_encode(render(scene, size, _background(rng)), "PNG"))
            caption = describe(scene)
            f.write(json.dumps({"image": rel, "caption": caption}) + "\n")
            yield caption


def _write_pairs_tar(
    split_dir: str, n: int, size: int, rng: np.random.Generator, shard_size: int = 1000
) -> Iterator[str]:
    os.makedirs(split_dir, exist_ok=True)
    for shard in range(0, n, shard_size):
        with tarfile.open(os.path.join(split_dir, f"{shard // shard_size:05d}.tar"), "w") as tar:
            for i in range(shard, min(n, shard + shard_size)):
                scene = random_scene(rng)
                caption = describe_short(scene, rng)
                key = f"{i:09d}"
                meta = {"key": key, "caption": caption, "width": size, "height": size, "status": "success"}
                for ext, data in (
                    ("jpg", _encode(render(scene, size, _background(rng)), "JPEG")),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                yield caption


def _doc(rng: np.random.Generator, size: int, doc_id: str, image_dir: str) -> tuple[list, list]:
    texts: list[str | None] = [DOC_TITLES[rng.integers(len(DOC_TITLES))] + "."]
    images: list[str | None] = [None]
    for k in range(int(rng.integers(1, 8))):
        scene = random_scene(rng)
        rel = f"images/{doc_id}_{k}.jpg"
        with open(os.path.join(image_dir, os.path.basename(rel)), "wb") as f:
            f.write(_encode(render(scene, size, _background(rng)), "JPEG"))
        desc = describe(scene)
        if rng.random() < 0.3:  # Text before its image: what p_next = 0.5 linking is for.
            texts.append(f"the next picture shows {desc}.")
            images.append(None)
            texts.append(None)
            images.append(rel)
        else:
            texts.append(None)
            images.append(rel)
            texts.append(f"{AFTER[rng.integers(len(AFTER))]} {desc}.")
            images.append(None)
        if rng.random() < 0.3:
            texts.append(DOC_FILLERS[rng.integers(len(DOC_FILLERS))])
            images.append(None)
    return texts, images


def _write_docs(split_dir: str, n: int, size: int, rng: np.random.Generator) -> Iterator[str]:
    image_dir = os.path.join(split_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    with open(os.path.join(split_dir, "docs-00000.jsonl"), "w") as f:
        for i in range(n):
            doc_id = f"doc{i:06d}"
            texts, images = _doc(rng, size, doc_id, image_dir)
            f.write(json.dumps({"id": doc_id, "texts": texts, "images": images}) + "\n")
            yield from (t for t in texts if t)


def write_video(path: str, frames: np.ndarray, fps: float) -> None:
    """Encodes uint8 [T, H, W, 3] frames with PyAV: H.264-compatible MPEG-4 in .mp4, VP8 in .webm."""
    import av

    codec = "libvpx" if path.endswith(".webm") else "mpeg4"
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 400_000  # Small frames: keep colours faithful, files stay a few kB.
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _video(rng: np.random.Generator, size: int, fps: int) -> tuple[np.ndarray, str]:
    mover = random_scene(rng, 1)[0]
    direction = list(MOTIONS)[rng.integers(len(MOTIONS))]
    scene, caption = (
        [mover],
        f"{_count(1, mover.colour)} {mover.colour} {mover.shape} {MOTION_TEXT[direction]}",
    )
    if rng.random() < 0.5:  # A still distractor: the caption is only right if you look at which one moves.
        still = random_scene(rng, 1)[0]
        while (still.shape, still.colour) == (mover.shape, mover.colour):
            still = random_scene(rng, 1)[0]
        scene.append(still)
        caption += f" while {_count(1, still.colour)} {still.colour} {still.shape} stays still"
    duration = int(rng.integers(8, 13))
    n = duration * fps
    ux, uy = MOTIONS[direction]
    lane = float(rng.uniform(0.25, 0.75)) * size
    margin = size * 0.15
    bg = _background(rng)
    frames = []
    for t in range(n):
        a = margin + (size - 2 * margin) * t / (n - 1)  # From one side to the other over the clip.
        x = a if ux > 0 else size - a if ux < 0 else lane
        y = a if uy > 0 else size - a if uy < 0 else lane
        positions = [(x, y)] + ([_centre(scene[1], size)] if len(scene) > 1 else [])
        frames.append(render(scene, size, bg, positions))
    return np.stack(frames), caption


def _write_videos(split_dir: str, n: int, size: int, rng: np.random.Generator, fps: int = 2) -> Iterator[str]:
    with open(os.path.join(_mkdir(split_dir), "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i in range(n):
            frames, caption = _video(rng, size, fps)
            vid, page = f"{1000000 + i}", f"{(i // 50) * 50:06d}_{(i // 50) * 50 + 49:06d}"
            ext = "webm" if i % 25 == 7 else "mp4"  # A few VP8/WebM files exercise the second container/codec.
            write_video(os.path.join(_mkdir(os.path.join(split_dir, "videos", page)), f"{vid}.{ext}"), frames, fps)
            seconds = len(frames) // fps
            writer.writerow([vid, f"https://example.invalid/{vid}.{ext}", f"PT00H00M{seconds:02d}S", page, caption])
            yield caption


def write_classification(out: str, per_class: int, size: int, rng: np.random.Generator) -> list[str]:
    """ImageNet-style folders OUT/COLOUR_SHAPE/NNNN.png, one shape anywhere on the grid per image; returns the
    class names ('red circle', ...), which are also how an ALIGN-style caption names them."""
    names = []
    for colour in COLOURS:
        for shape in SHAPES:
            d = _mkdir(os.path.join(out, f"{colour}_{shape}"))
            for i in range(per_class):
                dx, dy = rng.uniform(-0.1, 0.1, size=2)
                s = Shape(shape, colour, int(rng.integers(9)), float(dx), float(dy), float(rng.uniform(0.55, 0.8)))
                with open(os.path.join(d, f"{i:04d}.png"), "wb") as f:
                    f.write(_encode(render([s], size, _background(rng)), "PNG"))
            names.append(f"{colour} {shape}")
    return names


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def counts(num: int) -> dict[str, int]:
    """Records per dataset for `num` (pairs): documents hold ~4 images each, videos are the smallest set."""
    return {"m3w": max(num // 4, 4), "ltip": num, "align": num, "vtp": max(num // 8, 4)}


def write_sources(
    out: str,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_eval: int = 200,
    image_size: int = 64,
    vocab_size: int = 512,
) -> dict[str, str]:
    """Writes the four source datasets and trains the tokenizer; returns {name: dir, 'tokenizer': path}."""
    writers = {
        "m3w": _write_docs,
        "ltip": _write_pairs_jsonl,
        "align": _write_pairs_tar,
        "vtp": _write_videos,
    }
    train_text: list[str] = []
    for split_i, (split, num) in enumerate((("train", num_train), ("eval", num_eval))):
        for name_i, name in enumerate(NAMES):
            rng = np.random.default_rng([seed, split_i, name_i])  # Independent streams: eval is held out.
            texts = list(writers[name](os.path.join(out, name, split), counts(num)[name], image_size, rng))
            if split == "train":
                train_text.extend(texts)
    paths = {name: os.path.join(out, name) for name in NAMES}
    classify_rng = np.random.default_rng([seed, 2])
    write_classification(os.path.join(out, "classify"), max(num_eval // 50, 2), image_size, classify_rng)
    paths["classify"] = os.path.join(out, "classify")
    paths["tokenizer"] = train_tokenizer(train_text, os.path.join(out, "tokenizer.model"), vocab_size)
    return paths


def train_tokenizer(texts: list[str], path: str, vocab_size: int = 512) -> str:
    """A SentencePiece BPE model of exactly `vocab_size` pieces; no pad piece (pad = base_vocab_size + 2).

    BPE over whitespace-split words ends with about one piece per word of this small language, which keeps
    captions short (~20 tokens) and readable. The language has fewer pieces than a round vocabulary size, so
    the rest is filled with `<unusedK>` symbols: model configs can then state the vocabulary size up front.
    """
    import sentencepiece as spm

    def train(size: int, filler: int) -> bytes:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=size,
            model_type="bpe",
            hard_vocab_limit=filler >= 0,  # First pass (-1): as many pieces as the text supports.
            user_defined_symbols=[f"<unused{k}>" for k in range(max(filler, 0))],
            character_coverage=1.0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        return model.getvalue()

    proto = train(vocab_size, -1)
    natural = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    if natural < vocab_size:
        proto = train(vocab_size, vocab_size - natural)
    with open(path, "wb") as f:
        f.write(proto)
    return path


# --- Preparation for training (sources + builds), and the matching data config. ----------------------


def synthetic_data_config(root: str, batch_sizes: dict[str, int] | None = None) -> ml_collections.ConfigDict:
    """The data config of the synthetic mixture prepared under `root` (see prepare_synthetic)."""
    from flamingo_jax.data.loader import default_dataset_config

    batch_sizes = batch_sizes or {"m3w": 8, "ltip": 16, "align": 16, "vtp": 8}
    cfg = ml_collections.ConfigDict()
    cfg.tokenizer = os.path.join(root, "sources", "tokenizer.model")
    cfg.worker_count = 0
    cfg.datasets = ml_collections.ConfigDict()
    for name in NAMES:
        ds = default_dataset_config(KIND_OF[name])
        ds.data_dir = os.path.join(root, name)
        ds.source_dir = os.path.join(root, "sources", name)
        ds.weight = WEIGHTS[name]
        ds.batch_size = batch_sizes[name]
        ds.augment = False  # Captions name colours and left/right: flips and colour jitter would falsify them.
        cfg.datasets[name] = ds
    return cfg


def prepare_synthetic(
    root: str,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_eval: int = 200,
    image_size: int = 64,
    vocab_size: int = 512,
    force: bool = False,
) -> dict:
    """Generates the sources under root/sources and builds root/{m3w,ltip,align,vtp}, unless already done.

    Returns {"tokenizer": path, "data_dirs": {name: dir}, "reports": {name: build report}}. A preparation with
    other parameters (or an interrupted one) is replaced; only directories this function creates are removed.
    """
    from flamingo_jax.data import builders

    os.makedirs(root, exist_ok=True)
    params = {
        "format": _FORMAT_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_eval": num_eval,
        "image_size": image_size,
        "vocab_size": vocab_size,
    }
    marker = os.path.join(root, _MARKER)
    with _lock(os.path.join(root, ".prepare.lock")):  # Several local processes may start at once.
        if not force and os.path.isfile(marker):
            with open(marker) as f:
                done = json.load(f)
            if done.get("params") == params:
                return done["result"]
        for d in (*NAMES, "sources", _MARKER):
            path = os.path.join(root, d)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        src = write_sources(
            os.path.join(root, "sources"),
            seed=seed,
            num_train=num_train,
            num_eval=num_eval,
            image_size=image_size,
            vocab_size=vocab_size,
        )
        reports = {name: builders.build(KIND_OF[name], src[name], os.path.join(root, name)) for name in NAMES}
        result = {
            "tokenizer": src["tokenizer"],
            "classify": src["classify"],
            "data_dirs": {n: os.path.join(root, n) for n in NAMES},
            "reports": {
                n: {s: {"written": r["written"], "skipped": r["skipped"]} for s, r in rep["splits"].items()}
                for n, rep in reports.items()
            },
        }
        with open(marker + ".tmp", "w") as f:
            json.dump({"params": params, "result": result}, f, indent=2)
        os.replace(marker + ".tmp", marker)  # Written last and atomically: its presence means complete.
        return result


@contextlib.contextmanager
def _lock(path: str):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_train", type=int, default=2000, help="Train pairs per pair dataset (docs: /4, videos: /8)."
    )
    parser.add_argument("--num_eval", type=int, default=200, help="Held-out records, same scaling.")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument(
        "--build",
        action="store_true",
        help="Also build ArrayRecord data: sources go to OUT/sources, data to OUT/<name>.",
    )
    args = parser.parse_args(argv)
    kwargs = {
        "seed": args.seed,
        "num_train": args.num_train,
        "num_eval": args.num_eval,
        "image_size": args.image_size,
        "vocab_size": args.vocab_size,
    }
    if args.build:
        print(json.dumps(prepare_synthetic(args.out, **kwargs), indent=2))
    else:
        print(json.dumps(write_sources(args.out, **kwargs), indent=2))


if __name__ == "__main__":
    main()
