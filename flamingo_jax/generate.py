"""Captioning with an exported model: greedy decoding or beam search, with the key/value cache.

    python -m flamingo_jax.generate --model=OUT --image=a.jpg [--prompt="<image>"] [--beam=4] [--max_new_tokens=20]
                                    [--mesh=1,1,-1]

The visual tokens are computed once (`encode_media`); the prompt fills the cache in one call and each new token
is one more `decode` call against it. Images are prepared as the evaluation pipeline prepares them (resized and
padded, or centre-cropped, to the model's resolution; uint8). Generation stops at `<|endofchunk|>` (or the
tokenizer's end-of-sequence token); `<image>` and padding are never generated. With `--mesh` the model is loaded
onto that mesh (`load_exported(..., mesh=...)`, from an export written on any mesh) and generation runs sharded:
under the export's sharding rules, with the key/value cache sharded like the model's activations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flamingo_jax import sharding
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


# Logical axes of the cache's arrays (`Flamingo.init_cache`): sharded like the model's activations under the rules.
CACHE_AXES = {
    "k": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "valid": ("batch", "length"),
    "end": (),
    "next_pos": ("batch",),
    "images_before": ("batch",),
}


def _constrain_cache(cache: dict) -> dict:
    """Batch over the `batch` rule's axes and kv heads over `tensor`, each where it divides (inside a mesh)."""
    return {k: sharding.constrain(v, CACHE_AXES[k]) if k in CACHE_AXES else v for k, v in cache.items()}


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


def model_mesh(model: nnx.Module) -> Mesh | None:
    """The mesh a model's parameters live on (`load_exported(..., mesh=...)`), or None for one device."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
            return sh.mesh
    return None


class Decoder:
    """Jitted `encode_media` / `decode` / cache creation and reordering for one model (each compiled once per shape).

    On a model whose parameters span a mesh (default: the mesh they live on), every function is traced under
    `sharding.use_mesh_rules(mesh, rules)`: the model's activation constraints apply, and the key/value cache is
    sharded like the activations, batch over the `batch` rule's axes and kv heads over `tensor` where they divide.
    """

    def __init__(self, model: flamingo.Flamingo, mesh: Mesh | None = None, rules: sharding.Rules | None = None):
        self.model = model
        self.mesh = mesh if mesh is not None else model_mesh(model)
        self.rules = sharding.rules_from_config(rules)
        graphdef, self.state = nnx.split(model)

        def traced(fn: Callable) -> Callable:
            if self.mesh is None:
                return fn

            def under_mesh(*args: Any) -> Any:
                with sharding.use_mesh_rules(self.mesh, self.rules):
                    return fn(*args)

            return under_mesh

        self._encode = jax.jit(traced(lambda st, media: nnx.merge(graphdef, st).encode_media(media)))

        def decode(st: Any, visual: jax.Array, ids: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
            logits, cache = nnx.merge(graphdef, st).decode(visual, ids, cache)
            return logits, _constrain_cache(cache)

        self._decode = jax.jit(traced(decode))
        self._init = jax.jit(traced(lambda b, n: _constrain_cache(model.init_cache(b, n))), static_argnums=(0, 1))
        self._reorder = jax.jit(traced(lambda cache, parents: _constrain_cache(_reorder(cache, parents))))

    def _put(self, x: Any, dtype: Any = None) -> jax.Array:
        """A host array on the model's devices (replicated), for the jitted functions' inputs."""
        x = np.asarray(x, dtype)
        return jnp.asarray(x) if self.mesh is None else jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

    def encode(self, media: np.ndarray) -> jax.Array:
        return self._encode(self.state, self._put(media))

    def init_cache(self, batch: int, max_len: int) -> dict:
        return self._init(batch, max_len)

    def reorder(self, cache: dict, parents: Any) -> dict:
        return self._reorder(cache, self._put(parents, np.int32))

    def decode(self, visual: jax.Array, ids: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        """Log-probabilities of the next token after `ids` [B, L] (float32 [B, vocab]) and the updated cache."""
        logits, cache = self._decode(self.state, visual, self._put(ids, np.int32), cache)
        return np.array(jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)), cache


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
    # Never `<image>`, pad, or the LM's padding rows that no text maps to (Qwen2 has 271 of them).
    banned = [i for i in {tok.image_id, tok.pad_id} if i not in stop]
    banned += list(range(tok.own_vocab_size, tok.base_vocab_size))
    k = max(1, int(beam))
    visual = jnp.repeat(dec.encode(media), k, axis=0)  # once; every hypothesis attends to the same image
    cache = dec.init_cache(k, len(prompt_ids) + max_new_tokens)
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
        cache = dec.reorder(cache, parents)
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
    dec = decoder or Decoder(model, rules=cfg.get("sharding_rules"))
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

    from flamingo_jax import export

    del argv
    f = flags.FLAGS
    exported = export.load_exported(f.model, mesh=export._mesh(export.parse_mesh(f.mesh) or (1, 1, 1)))
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
    flags.DEFINE_string(
        "mesh", "1,1,1", "('data', 'fsdp', 'tensor') mesh to load the model onto, e.g. 1,1,-1 for all devices."
    )
    app.run(main)
