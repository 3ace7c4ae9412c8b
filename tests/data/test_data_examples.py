"""Token sequences: caption packing, interleaved windows, and the `<image>`/media invariants."""

import numpy as np
import pytest

from flamingo_jax.data import examples, synthetic
from flamingo_jax.data.tokenizer import Tokenizer

TEXT = ["a red circle at the top left", "two blue squares in the center", "this picture shows"] * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return Tokenizer.from_path(synthetic.train_tokenizer(TEXT, str(path), vocab_size=64))


def test_pack_shifts_and_masks(tok):
    ids = [tok.image_id, 10, 11, tok.image_id, 12, tok.eoc_id]
    out = examples.pack(ids, 8, tok)
    np.testing.assert_array_equal(out["tokens"], [*ids, tok.pad_id, tok.pad_id])
    np.testing.assert_array_equal(out["targets"][:5], ids[1:])
    assert (out["targets"][5:] == tok.pad_id).all()
    # Masked: padding targets and the `<image>` target (position 2 predicts the second image).
    np.testing.assert_array_equal(out["loss_mask"], [1, 1, 0, 1, 1, 0, 0, 0])
    assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == np.float32
    with pytest.raises(ValueError):
        examples.pack(list(range(10)), 8, tok)


def test_caption_format_and_truncation(tok):
    ids = examples.caption_ids("a red circle", 32, tok)
    assert ids[0] == tok.image_id and ids[-1] == tok.eoc_id
    assert tok.decode(ids) == "<image>a red circle<|endofchunk|>"
    long = examples.caption_ids(" ".join(["two blue squares"] * 40), 32, tok)
    assert len(long) == 33 and long[-1] == tok.eoc_id  # <|endofchunk|> survives truncation.
    bos = examples.caption_ids("a red circle", 32, tok, add_bos=True)
    assert bos[:2] == [tok.bos_id, tok.image_id]
    # A caption quoting the special tokens cannot add an image.
    assert examples.caption_ids("<image><image>", 32, tok).count(tok.image_id) == 1


def test_document_format(tok):
    ids, image_of = examples.document_ids(
        ["this picture shows", "a red circle", "two blue squares"], [False, True, False, True, False], tok
    )
    text = tok.decode(ids)
    assert text == (
        "this picture shows<|endofchunk|><image>a red circle<|endofchunk|><image>two blue squares<|endofchunk|>"
    )
    assert image_of == [0, 1]
    ids, image_of = examples.document_ids(["a red circle"], [True, True, False], tok)
    assert tok.decode(ids) == "<image><image>a red circle<|endofchunk|>"


def test_window_caps_images_and_keeps_order(tok):
    n_images = 9
    texts = ["a red circle at the top left"] * n_images
    ids, image_of = examples.document_ids(texts, [True, False] * n_images, tok)
    out, images = examples.window(ids, image_of, 1000, 5, tok, rng=None)
    assert images == [0, 1, 2, 3, 4]
    assert out.count(tok.image_id) == 5
    assert len(out) == len(ids) - 4  # The 4 extra `<image>` ids are dropped, not the text.


def test_window_invariants_random(tok):
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        flags = list(rng.random(n) < 0.5)
        texts = [TEXT[i % 3] * int(rng.integers(1, 4)) for i in range(n - sum(flags))]
        ids, image_of = examples.document_ids(texts, flags, tok)
        seq_len, max_media = int(rng.integers(4, 40)), int(rng.integers(1, 6))
        out, images = examples.window(ids, image_of, seq_len, max_media, tok, rng)
        packed = examples.pack(out, seq_len, tok)
        n_in_tokens = int(np.sum(packed["tokens"] == tok.image_id))
        assert n_in_tokens == len(images) <= max_media
        assert images == sorted(images) and len(set(images)) == len(images)
        assert len(out) == min(seq_len + 1, len(out)) and len(out) <= seq_len + 1
        assert not np.any(packed["loss_mask"][packed["targets"] == tok.image_id])
