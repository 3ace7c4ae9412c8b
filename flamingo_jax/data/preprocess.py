"""Decoding and preprocessing of images and videos (numpy in, numpy out; runs in Grain workers).

Images are stored encoded (JPEG/PNG/...) and videos as their container bytes (mp4/webm/...), so the model
resolution, the crop policy and the video frame rate are loader settings, not build settings.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

# A decompression bomb guard: reject absurd images before allocating them (PIL warns at ~89M pixels).
MAX_IMAGE_PIXELS = 64_000_000


class MediaError(ValueError):
    """An image or video that cannot be decoded."""


# --- Images. -----------------------------------------------------------------------------------------


def decode_image(data: bytes) -> np.ndarray:
    """Decodes image bytes to uint8 [H, W, 3] RGB; raises MediaError on anything unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"image too large: {img.width}x{img.height}")
            img.load()  # Truncated files only fail here, not in open().
            arr = np.asarray(img.convert("RGB"))
    except MediaError:
        raise
    except Exception as e:
        # Without object addresses, so that reports of identical builds are identical.
        msg = re.sub(r" object at 0x[0-9a-f]+", "", str(e))
        raise MediaError(f"undecodable image: {type(e).__name__}: {msg}") from e
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise MediaError(f"bad image shape {arr.shape}")
    return arr


def resize_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Resizes so the longer side is `size` (aspect ratio kept) and zero-pads, centred, to size x size."""
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = _resize(img, nh, nw)
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def resize_crop(img: np.ndarray, size: int, rng: np.random.Generator | None, max_scale: float) -> np.ndarray:
    """Resizes the shorter side to size * s and crops size x size.

    Training (rng given): s ~ U[1, max_scale] and a uniformly random crop. Evaluation: s = 1, centre crop.
    """
    return crop_frames(img[None], size, rng, max_scale)[0]


def crop_frames(frames: np.ndarray, size: int, rng: np.random.Generator | None, max_scale: float) -> np.ndarray:
    """`resize_crop` for [T, H, W, 3] with the same crop for all frames (a video must not jitter)."""
    h, w = frames.shape[1:3]
    s = 1.0 if rng is None else float(rng.uniform(1.0, max(1.0, max_scale)))
    scale = size * s / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if rng is None:
        top, left = (nh - size) // 2, (nw - size) // 2
    else:
        top, left = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    return np.stack([_resize(f, nh, nw)[top : top + size, left : left + size] for f in frames])


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def augment(frames: np.ndarray, rng: np.random.Generator, flip_prob: float, color_jitter: float) -> np.ndarray:
    """Random horizontal flip and brightness/contrast/saturation jitter, identical for all frames."""
    if flip_prob > 0 and rng.random() < flip_prob:
        frames = frames[:, :, ::-1]
    if color_jitter > 0:
        b, c, s = rng.uniform(1 - color_jitter, 1 + color_jitter, size=3)
        x = frames.astype(np.float32) * b
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * c + mean
        grey = x.mean(axis=-1, keepdims=True)
        x = (x - grey) * s + grey
        frames = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(frames)


def preprocess_frames(
    frames: np.ndarray,
    size: int,
    *,
    resize: str,
    rng: np.random.Generator | None,
    augment_: bool,
    flip_prob: float = 0.5,
    color_jitter: float = 0.1,
    crop_max_scale: float = 1.15,
) -> np.ndarray:
    """[T, H, W, 3] uint8 (any H, W) -> [T, size, size, 3] uint8; rng=None: evaluation (deterministic)."""
    if resize == "pad":
        out = np.stack([resize_pad(f, size) for f in frames])
    elif resize == "random_crop":
        out = crop_frames(frames, size, rng, crop_max_scale)
    else:
        raise ValueError(f"resize must be 'pad' or 'random_crop', got {resize!r}")
    if augment_ and rng is not None:
        out = augment(out, rng, flip_prob, color_jitter)
    return out


# --- Videos. -----------------------------------------------------------------------------------------


def probe_video(data: bytes) -> tuple[float, int]:
    """Decodes every frame once (build-time validation); returns (duration_s, num_frames)."""
    times = [t for t, _ in _iter_frames(data, until=None, want_pixels=False)]
    if not times:
        raise MediaError("video has no decodable frames")
    return _duration(data, times), len(times)


def sample_times(duration: float, num_frames: int, fps: float, rng: np.random.Generator | None) -> np.ndarray:
    """`num_frames` timestamps `1/fps` apart: at a random start in training, centred in evaluation.

    A video shorter than the window is sampled evenly over its whole length instead (so a short clip still
    shows its motion), which is the only case where the effective rate differs from `fps`.
    """
    span = (num_frames - 1) / fps
    if duration < span:
        return np.linspace(0.0, duration, num_frames)
    slack = duration - span
    start = slack / 2 if rng is None else float(rng.uniform(0.0, slack))
    return start + np.arange(num_frames) / fps


def decode_video(
    data: bytes, num_frames: int, fps: float, rng: np.random.Generator | None, duration: float | None = None
) -> np.ndarray:
    """Decodes `num_frames` RGB frames sampled at `fps` (see sample_times) -> uint8 [T, H, W, 3]."""
    if duration is None or duration <= 0:
        duration, _ = probe_video(data)
    times = sample_times(duration, num_frames, fps, rng)
    frames = _frames_at(data, times)
    return np.stack(frames)


def _frames_at(data: bytes, times: Sequence[float]) -> list[np.ndarray]:
    """For each time, the last frame shown at that time (the first frame for times before it)."""
    from av.video.reformatter import VideoReformatter

    out: list[np.ndarray | None] = [None] * len(times)
    cache: dict[int, np.ndarray] = {}
    # frame.to_ndarray(format=...) builds a new colour converter per call (10x the decoding time of a small
    # frame); one reformatter reuses it. Only the chosen frames are converted.
    reformatter = VideoReformatter()

    def rgb(k: int, frame) -> np.ndarray:
        if k not in cache:
            cache[k] = reformatter.reformat(frame, format="rgb24").to_ndarray()
        return cache[k]

    prev = None
    j = 0
    for k, (t, frame) in enumerate(_iter_frames(data, until=float(max(times)), want_pixels=False)):
        while j < len(times) and times[j] < t - 1e-6:
            out[j] = rgb(k - 1, prev) if prev is not None else rgb(k, frame)
            j += 1
        prev = frame
    if prev is None:
        raise MediaError("video has no decodable frames")
    for i in range(j, len(times)):
        out[i] = rgb(k, prev)
    return out  # type: ignore[return-value]


def _iter_frames(data: bytes, until: float | None, want_pixels: bool):
    """Yields (time_s, frame) in presentation order; stops after the first frame past `until`.

    frame is an RGB array if want_pixels, else PyAV's VideoFrame (convert it with to_ndarray only if needed).
    """
    import av  # Imported lazily: only video pipelines pay for it.
    from av.video.reformatter import VideoReformatter

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            # One decoding thread: loader workers already decode in parallel, and FFmpeg's default thread pool
            # costs more to start than decoding a short clip.
            stream.codec_context.thread_count = 1
            tb = float(stream.time_base) if stream.time_base else None
            rate = float(stream.average_rate) if stream.average_rate else None
            t0 = None
            reformatter = VideoReformatter() if want_pixels else None
            for k, frame in enumerate(container.decode(stream)):
                if frame.pts is not None and tb:
                    t = frame.pts * tb
                else:
                    t = k / rate if rate else float(k)
                t0 = t if t0 is None else t0
                t -= t0  # Containers may start at a non-zero time; sampling is relative to the first frame.
                yield t, (reformatter.reformat(frame, format="rgb24").to_ndarray() if want_pixels else frame)
                if until is not None and t > until:
                    return
    except MediaError:
        raise
    except Exception as e:
        msg = re.sub(r" object at 0x[0-9a-f]+", "", str(e))
        raise MediaError(f"undecodable video: {type(e).__name__}: {msg}") from e


def _duration(data: bytes, times: list[float]) -> float:
    """Time of the last frame plus one frame interval (what a player shows), from the decoded timestamps."""
    if len(times) == 1:
        return 1.0
    step = (times[-1] - times[0]) / (len(times) - 1)
    return float(times[-1] - times[0] + step)
