"""Captioning with an exported model: greedy decoding or beam search, with the key/value cache.

    python -m flamingo_jax.generate --model=OUT --image=a.jpg [--prompt="<image>"] [--beam=4] [--max_new_tokens=20]

The visual tokens are computed once (`encode_media`); the prompt fills the cache in one call and each new token
is one more `decode` call against it. Images are prepared as the evaluation pipeline prepares them (resized and
padded, or centre-cropped, to the model's resolution; uint8). Generation stops at `<|endofchunk|>` (or the
tokenizer's end-of-sequence token); `<image>` and padding are never generated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax.data import preprocess
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.models import flamingo


def prepare_image(image: np.ndarray, size: int, resize: str = "pad") -> np.ndarray:
    """uint8 [H, W, 3] -> media uint8 [1, 1, 1, size, size, 3] (batch, images, frames), as in evaluation."""
    if resize == "pad":
        img = preprocess.resize_pad(image, size)
    elif resize == "random_crop":
        img = preprocess.resize_crop(image, size, None, 1.0)  # evaluation: centre crop, no scale jitter
    else:
        raise ValueError(f"resize must be 'pad' or 'random_crop', got {resize!r}")
    return img[None, None, None]


class Decoder:
    """Jitted `encode_media` / `decode` / cache reordering for one model (each compiled once per shape)."""

    def __init__(self, model: flamingo.Flamingo):
        self.model = model
        graphdef, self.state = nnx.split(model)
        self._encode = jax.jit(lambda st, media: nnx.merge(graphdef, st).encode_media(media))
        self._decode = jax.jit(lambda st, visual, ids, cache: nnx.merge(graphdef, st).decode(visual, ids, cache))

    def encode(self, media: np.ndarray) -> jax.Array:
        return self._encode(self.state, jnp.asarray(media))

    def decode(self, visual: jax.Array, ids: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        """Log-probabilities of the next token after `ids` [B, L] (float32 [B, vocab]) and the updated cache."""
        logits, cache = self._decode(self.state, visual, jnp.asarray(ids, jnp.int32), cache)
        return np.array(jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)), cache


@jax.jit
def _reorder(cache: dict, parents: jax.Array) -> dict:
    """Cache rows in beam order `parents`: keys/values are [layers, batch, ...], the rest [batch, ...] or scalar."""
    out = {}
    for k, v in cache.items():
        if k in ("k", "v"):
            out[k] = jnp.take(v, parents, axis=1)
        elif v.ndim:
            out[k] = jnp.take(v, parents, axis=0)
        else:
            out[k] = v
    return out


def generate(
    dec: Decoder,
    tok: Tokenizer,
    media: np.ndarray,
    prompt_ids: list[int],
    *,
    beam: int = 1,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    length_penalty: float = 0.0,
) -> list[int]:
    """New token ids after the prompt (without the stop token). beam=1: greedy decoding; no stop token before
    `min_new_tokens` tokens.

    Beam search keeps `beam` live hypotheses; one that ends in a stop token is finished with the score
    sum(log p) / length**length_penalty, and the search ends when `beam` hypotheses are finished and none of the
    live ones scores better, or after max_new_tokens.
    """
    n_img = sum(i == tok.image_id for i in prompt_ids)
    if n_img != media.shape[1]:
        raise ValueError(f"the prompt has {n_img} <image> tokens for {media.shape[1]} images")
    max_len = dec.model.cfg.lm.max_len
    if len(prompt_ids) + max_new_tokens > max_len:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds {max_len}")
    stop = {tok.eoc_id} | ({tok.eos_id} if tok.eos_id is not None else set())
    banned = [i for i in {tok.image_id, tok.pad_id} if i not in stop]
    k = max(1, int(beam))
    visual = jnp.repeat(dec.encode(media), k, axis=0)  # once; every hypothesis attends to the same image
    cache = dec.model.init_cache(k, len(prompt_ids) + max_new_tokens)
    logp, cache = dec.decode(visual, np.tile(np.asarray(prompt_ids)[None], (k, 1)), cache)
    scores = np.full(k, -np.inf)
    scores[0] = 0.0  # all rows hold the same prompt: expand the first only
    seqs: list[list[int]] = [[] for _ in range(k)]
    finished: list[tuple[float, list[int]]] = []
    norm = lambda s, n: s / max(n, 1) ** length_penalty
    for t in range(max_new_tokens):
        logp[:, banned + (sorted(stop) if t < min_new_tokens else [])] = -np.inf
        cand = scores[:, None] + logp
        order = np.argsort(-cand, axis=None, kind="stable")[: 2 * k]
        parents, tokens, new_scores = [], [], []
        for rank, flat in enumerate(order):
            b, v = divmod(int(flat), cand.shape[1])
            s = float(cand[b, v])
            if not np.isfinite(s):
                break
            if v in stop:
                if rank < k:  # a stop outside the top k would not have been chosen (greedy: only the argmax)
                    finished.append((norm(s, len(seqs[b]) + 1), seqs[b]))
            else:
                parents.append(b)
                tokens.append(v)
                new_scores.append(s)
            if len(parents) == k:
                break
        done = len(finished) >= k and max(f[0] for f in finished) >= max(new_scores, default=-np.inf)
        if not parents or done:
            break
        while len(parents) < k:  # fewer live candidates than beams: pad with dead rows
            parents.append(parents[0])
            tokens.append(tokens[0])
            new_scores.append(-np.inf)
        cache = _reorder(cache, jnp.asarray(parents, jnp.int32))
        seqs = [[*seqs[p], token] for p, token in zip(parents, tokens)]
        scores = np.asarray(new_scores)
        logp, cache = dec.decode(visual, np.asarray(tokens)[:, None], cache)
    else:  # max_new_tokens reached: the hypotheses still live compete with the finished ones
        finished += [(norm(s, len(q)), q) for s, q in zip(scores, seqs) if np.isfinite(s)]
    return max(finished, key=lambda f: f[0])[1] if finished else []


def caption(
    exported: Any,
    image: np.ndarray,
    prompt: str = "<image>",
    *,
    beam: int = 1,
    max_new_tokens: int = 20,
    min_new_tokens: int = 1,
    length_penalty: float = 0.0,
    decoder: Decoder | None = None,
) -> str:
    """The text an exported model (`flamingo_jax.load_exported(...)`) writes after `prompt` for one image."""
    model, tok, cfg = exported
    pre = cfg["preprocess"]
    media = prepare_image(image, pre["image_size"], pre["resize"])
    ids = ([tok.bos_id] if pre["add_bos"] and tok.bos_id is not None else []) + tok.encode(prompt)
    dec = decoder or Decoder(model)
    new = generate(
        dec,
        tok,
        media,
        ids,
        beam=beam,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        length_penalty=length_penalty,
    )
    return tok.decode(new)


def main(argv: list[str]) -> None:
    from absl import flags

    from flamingo_jax.export import load_exported

    del argv
    f = flags.FLAGS
    exported = load_exported(f.model)
    with open(f.image, "rb") as fh:
        image = preprocess.decode_image(fh.read())
    text = caption(
        exported,
        image,
        f.prompt,
        beam=f.beam,
        max_new_tokens=f.max_new_tokens,
        min_new_tokens=f.min_new_tokens,
        length_penalty=f.length_penalty,
    )
    print(text)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model", None, "An export directory (python -m flamingo_jax.export).", required=True)
    flags.DEFINE_string("image", None, "Image file (JPEG, PNG, ...).", required=True)
    flags.DEFINE_string("prompt", "<image>", "Text with one <image> where the image goes.")
    flags.DEFINE_integer("beam", 1, "Beam width; 1 is greedy decoding.")
    flags.DEFINE_integer("max_new_tokens", 20, "Most tokens to generate.")
    flags.DEFINE_integer("min_new_tokens", 1, "Fewest tokens to generate before a stop token is allowed.")
    flags.DEFINE_float("length_penalty", 0.0, "Beam scores are sum(log p) / length**length_penalty.")
    app.run(main)
