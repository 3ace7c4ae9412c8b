"""Image and video preprocessing: aspect-preserving pad, random crop, augmentation, frame sampling."""

import io

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.data import preprocess


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_and_errors():
    arr = np.full((6, 10, 3), 200, np.uint8)
    np.testing.assert_array_equal(preprocess.decode_image(_png(arr)), arr)
    grey = Image.fromarray(np.full((4, 4), 7, np.uint8))
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    assert preprocess.decode_image(buf.getvalue()).shape == (4, 4, 3)  # Any mode -> RGB.
    for bad in (b"", b"garbage", _png(arr)[:40]):
        with pytest.raises(preprocess.MediaError):
            preprocess.decode_image(bad)


def test_resize_pad_keeps_aspect_and_centres():
    img = np.full((20, 40, 3), 255, np.uint8)  # Wide: becomes 16 x 32 inside 32 x 32.
    out = preprocess.resize_pad(img, 32)
    assert out.shape == (32, 32, 3)
    rows = np.nonzero(out[:, :, 0].max(1))[0]
    assert (rows.min(), rows.max()) == (8, 23) and out[:, :, 0].min(0).max() == 0
    assert (out[8:24] == 255).all() and not out[:8].any() and not out[24:].any()


def test_random_crop_train_and_eval():
    img = np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8)
    rng = np.random.default_rng(0)
    crops = {preprocess.resize_crop(img, 32, rng, 1.15).tobytes() for _ in range(5)}
    assert len(crops) > 1
    a = preprocess.resize_crop(img, 32, None, 1.15)
    assert a.shape == (32, 32, 3) and a.tobytes() == preprocess.resize_crop(img, 32, None, 1.15).tobytes()
    with pytest.raises(ValueError, match="resize"):
        preprocess.preprocess_frames(img[None], 32, resize="stretch", rng=None, augment_=False)


def test_augment_is_per_clip_and_reproducible():
    frames = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    a = preprocess.augment(frames, np.random.default_rng(1), 1.0, 0.2)
    b = preprocess.augment(frames, np.random.default_rng(1), 1.0, 0.2)
    np.testing.assert_array_equal(a, b)
    flipped = preprocess.augment(frames, np.random.default_rng(1), 1.0, 0.0)
    np.testing.assert_array_equal(flipped, frames[:, :, ::-1])  # The same flip for every frame.
    # Evaluation (rng=None) never augments.
    out = preprocess.preprocess_frames(frames, 8, resize="pad", rng=None, augment_=True)
    np.testing.assert_array_equal(out, frames)


def test_sample_times():
    np.testing.assert_allclose(preprocess.sample_times(20.0, 8, 1.0, None), 6.5 + np.arange(8))
    t = preprocess.sample_times(20.0, 8, 2.0, np.random.default_rng(0))
    np.testing.assert_allclose(np.diff(t), 0.5)
    assert t[0] >= 0 and t[-1] <= 20.0
    np.testing.assert_allclose(preprocess.sample_times(3.5, 8, 1.0, None), np.linspace(0, 3.5, 8))


def test_decode_video_errors():
    with pytest.raises(preprocess.MediaError):
        preprocess.probe_video(b"\x00" * 1000)
