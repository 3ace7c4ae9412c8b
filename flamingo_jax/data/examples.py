"""Token sequences of training examples: pairs/video captions and interleaved-document windows.

Pure functions of token ids (no media), so the invariants the model relies on are easy to test:
- `tokens[l]` is the input at position l, `targets[l] = tokens[l + 1]` of the unpadded sequence;
- `loss_mask` is 0 on padding targets and where the target is `<image>` (an image is given, not predicted);
- every `<image>` id in `tokens` has exactly one media slot, in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flamingo_jax.data.tokenizer import Tokenizer


def pack(ids: Sequence[int], seq_len: int, tok: Tokenizer) -> dict[str, np.ndarray]:
    """tokens/targets/loss_mask of length seq_len from a sequence of at most seq_len + 1 ids."""
    ids = np.asarray(ids, np.int32)
    if len(ids) > seq_len + 1:
        raise ValueError(f"sequence of {len(ids)} ids does not fit seq_len={seq_len}")
    tokens = np.full(seq_len, tok.pad_id, np.int32)
    targets = np.full(seq_len, tok.pad_id, np.int32)
    n_in = min(len(ids), seq_len)
    tokens[:n_in] = ids[:n_in]
    n_tgt = max(len(ids) - 1, 0)
    targets[:n_tgt] = ids[1:]
    # Padding is masked by position, not by id: a tokenizer's own pad id may also be a real token.
    loss_mask = np.zeros(seq_len, np.float32)
    loss_mask[:n_tgt] = 1.0
    loss_mask[targets == tok.image_id] = 0.0
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}


def caption_ids(caption: str, seq_len: int, tok: Tokenizer, add_bos: bool = False) -> list[int]:
    """`[bos] <image> caption <|endofchunk|>`, the caption truncated so that `<|endofchunk|>` always fits.

    The sequence has seq_len + 1 ids at most (inputs are the first seq_len, targets the last seq_len).
    """
    head = ([tok.bos_id] if add_bos and tok.bos_id is not None else []) + [tok.image_id]
    budget = max(seq_len + 1 - len(head) - 1, 0)
    return head + tok.encode(caption, allow_special=False)[:budget] + [tok.eoc_id]


def text_ids(caption: str, seq_len: int, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """A caption for a text encoder (stage 1): `[bos] caption [eos]`, truncated to seq_len, zero padded, and its
    mask. BOS leads whether or not the tokenizer prepends it: it is the constant first position that a BERT-style
    encoder pools (its `[CLS]`)."""
    head = [tok.bos_id] if tok.bos_id is not None else []
    tail = [tok.eos_id] if tok.eos_id is not None else []
    body = tok.encode(caption, allow_special=False)[: max(seq_len - len(head) - len(tail), 0)]
    ids = (head + body + tail)[:seq_len]
    out = np.zeros(seq_len, np.int32)
    out[: len(ids)] = ids
    return out, np.arange(seq_len) < len(ids)


def document_ids(
    texts: Sequence[str], is_image: Sequence[bool], tok: Tokenizer, add_bos: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a whole document and, for each `<image>` id, the index of its image in the document.

    Flamingo's M3W format: `<image>` where each image was, `<|endofchunk|>` closing the text before every
    image and at the end of the document.
    """
    ids: list[int] = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    image_of: list[int] = []
    ti = ii = 0
    for flag in is_image:
        if flag:
            if ids and ids[-1] not in (tok.eoc_id, tok.bos_id, tok.image_id):
                ids.append(tok.eoc_id)
            ids.append(tok.image_id)
            image_of.append(ii)
            ii += 1
        else:
            ids.extend(tok.encode(texts[ti], allow_special=False))
            ti += 1
    if ids and ids[-1] != tok.eoc_id:
        ids.append(tok.eoc_id)
    return ids, image_of


def window(
    ids: Sequence[int],
    image_of: Sequence[int],
    seq_len: int,
    max_media: int,
    tok: Tokenizer,
    rng: np.random.Generator | None,
) -> tuple[list[int], list[int]]:
    """A window of seq_len + 1 ids (random start if rng, else the start) with at most max_media images.

    `<image>` ids beyond the first max_media of the window are dropped (with their images) and the window
    extends past them, so the window stays full. Returns (window ids, document image index per `<image>` among
    the first seq_len ids, i.e. the ones in `tokens`).
    """
    need = seq_len + 1
    start = 0
    if rng is not None and len(ids) > need:
        start = int(rng.integers(0, len(ids) - need + 1))
    out: list[int] = []
    images: list[int] = []
    k = sum(1 for t in ids[:start] if t == tok.image_id)  # Index of the next image in image_of.
    for t in ids[start:]:
        if len(out) == need:
            break
        if t == tok.image_id:
            k += 1
            if len(images) >= max_media:
                continue
            if len(out) < seq_len:  # An image only in targets (the very last id) needs no media.
                images.append(image_of[k - 1])
        out.append(t)
    return out, images
