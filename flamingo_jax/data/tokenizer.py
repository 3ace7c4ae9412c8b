"""Text tokenizers (SentencePiece `.model` or Hugging Face `tokenizer.json`) with Flamingo's added tokens.

The frozen LM keeps its own vocabulary; Flamingo appends exactly `NUM_ADDED_TOKENS` rows after its embedding
table, in this fixed order:

    image_id = base_vocab_size       `<image>`
    eoc_id   = base_vocab_size + 1   `<|endofchunk|>`
    pad_id   = the tokenizer's own pad id if it has one, else base_vocab_size + 2

`base_vocab_size` is the LM's number of embedding rows when the tokenizer is opened for a model
(`model_vocab_size`), which may exceed the tokenizer's own entries: Qwen2 pads its 151,665 tokens to 151,936
rows, and `<image>` must sit after the rows, where the model looks for it. Without a model it is the tokenizer's
own size. The model and the tokenizer therefore agree on the added ids by construction; `check_model_ids` is
the start check that they still do.

The pipeline never needs to save a tokenizer: it is loaded from a local path, and pickled (for Grain worker
processes) as that path only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

NUM_ADDED_TOKENS = 3
IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
_SPECIAL_RE = re.compile("(" + re.escape(IMAGE_TOKEN) + "|" + re.escape(EOC_TOKEN) + ")")

# Names under which Hugging Face tokenizers commonly spell their special tokens. A `tokenizer_config.json`
# next to `tokenizer.json` (if present) takes precedence over these guesses.
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")
_HF_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]", "<|im_end|>")
_HF_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used as is (missing, unreadable or ambiguous)."""


class Tokenizer:
    """A SentencePiece or Hugging Face tokenizer plus `<image>`, `<|endofchunk|>` and (maybe) pad."""

    def __init__(self, path: str, model_vocab_size: int | None = None):
        self.path = os.fspath(path)
        self.model_vocab_size = None if model_vocab_size is None else int(model_vocab_size)
        if not os.path.isfile(self.path):
            raise TokenizerError(f"Tokenizer file not found: {self.path!r}")
        try:
            if self.path.endswith(".json"):
                self._init_hf()
            else:
                self._init_sentencepiece()
        except TokenizerError:
            raise
        except Exception as e:  # The libraries raise assorted types for garbage files.
            raise TokenizerError(f"Cannot read tokenizer {self.path!r}: {e}") from e
        self.image_id = self.base_vocab_size
        self.eoc_id = self.base_vocab_size + 1
        if self.eos_id is None:
            raise TokenizerError(f"Tokenizer {self.path!r} has no end-of-sequence token.")

    @classmethod
    def from_path(cls, path: str | os.PathLike, model_vocab_size: int | None = None) -> Tokenizer:
        """Loads a SentencePiece `.model` or a Hugging Face `tokenizer.json` from a local path.

        `model_vocab_size`: the LM's embedding rows (`model.lm.vocab_size`, from the LM's config.json for a
        pretrained LM); the added tokens are placed after them. It may not be smaller than the tokenizer.
        """
        return cls(os.fspath(path), model_vocab_size)

    def _place_added(self, own_size: int, defined_at: int | None) -> int:
        """The base vocabulary size (where `<image>` goes) for a tokenizer of `own_size` ids, which defines
        `<image>` itself at `defined_at` (None if not)."""
        m = self.model_vocab_size
        # Ids in [own_vocab_size, base_vocab_size) are embedding rows no text maps to (padding of the table).
        self.own_vocab_size = own_size if defined_at is None else defined_at
        if m is None:
            return own_size if defined_at is None else defined_at
        if defined_at is not None and defined_at != m:
            raise TokenizerError(
                f"Tokenizer {self.path!r} defines {IMAGE_TOKEN!r} at id {defined_at}, but the model puts it at "
                f"id {m} (model.lm.vocab_size, the LM's embedding rows). Use a tokenizer without it, or the LM "
                "it was saved with."
            )
        if defined_at is None and own_size > m:
            raise TokenizerError(
                f"Tokenizer {self.path!r} has {own_size} ids but the model's embedding has {m} rows "
                "(model.lm.vocab_size, from the LM's config.json when model.lm_pretrained is set): ids "
                f"{m}..{own_size - 1} would collide with Flamingo's added tokens. Use the LM's own tokenizer."
            )
        return m

    # --- Backends. -------------------------------------------------------------------------------------

    def _init_sentencepiece(self) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        with open(self.path, "rb") as f:
            sp.LoadFromSerializedProto(f.read())
        self._sp, self._hf = sp, None
        n = sp.get_piece_size()
        for tok in (IMAGE_TOKEN, EOC_TOKEN):
            tid = sp.piece_to_id(tok)
            if sp.id_to_piece(tid) == tok:
                # Inside the base vocabulary, so never at the ids this framework reserves after it.
                raise TokenizerError(
                    f"Tokenizer {self.path!r} already defines {tok!r} at id {tid}; Flamingo appends it at "
                    f"id {n + (tok == EOC_TOKEN)}. Use a tokenizer without it (ambiguous otherwise)."
                )
        self.base_vocab_size = self._place_added(n, None)
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.base_vocab_size + 2
        # SentencePiece never adds BOS by itself; LLaMA's HF tokenizer did (`add_bos_token` in its config).
        self.adds_bos = bool(_hf_tokenizer_config(self.path).get("add_bos_token", False)) and self.bos_id is not None

    def _init_hf(self) -> None:
        import tokenizers

        hf = tokenizers.Tokenizer.from_file(self.path)
        self._sp, self._hf = None, hf
        vocab = hf.get_vocab(with_added_tokens=True)
        n = max(vocab.values()) + 1 if vocab else 0
        names = _hf_special_names(self.path)
        pad_tok = names.get("pad_token") or next((t for t in _HF_PAD if t in vocab), None)
        if hf.padding and hf.padding.get("pad_token"):
            pad_tok = hf.padding["pad_token"]
        defined_at = None
        if IMAGE_TOKEN in vocab or EOC_TOKEN in vocab:
            # Accept only the exact layout this framework would create (a tokenizer saved after adding them):
            # `<image>`, `<|endofchunk|>` (and optionally a pad) as the very last ids.
            k = vocab.get(IMAGE_TOKEN, -1)
            tail = {i for i in vocab.values() if i >= k}
            allowed = {k, k + 1} | ({k + 2} if pad_tok and vocab.get(pad_tok) == k + 2 else set())
            if k < 0 or vocab.get(EOC_TOKEN) != k + 1 or not tail <= allowed:
                raise TokenizerError(
                    f"Tokenizer {self.path!r} already defines {IMAGE_TOKEN!r}/{EOC_TOKEN!r} at ids "
                    f"{vocab.get(IMAGE_TOKEN)}/{vocab.get(EOC_TOKEN)}, not as the last ids of its vocabulary "
                    "(ambiguous). Use a tokenizer without them."
                )
            defined_at = k
        base = self.base_vocab_size = self._place_added(n, defined_at)
        eos_tok = names.get("eos_token") or next((t for t in _HF_EOS if t in vocab), None)
        bos_tok = names.get("bos_token") or next((t for t in _HF_BOS if t in vocab), None)
        self.eos_id = vocab.get(eos_tok) if eos_tok else None
        self.bos_id = vocab.get(bos_tok) if bos_tok else None
        self.pad_id = vocab[pad_tok] if pad_tok in vocab else base + 2
        # What the tokenizer's own post-processor does (LLaMA 2/3 templates prepend BOS; Qwen2 and GPT-2 don't):
        # the LM was pretrained on exactly that. tokenizer_config.json's `add_bos_token` overrides it, as in HF.
        with_special = hf.encode("a", add_special_tokens=True).ids
        adds = bool(with_special) and self.bos_id is not None and with_special[0] == self.bos_id
        self.adds_bos = bool(_hf_tokenizer_config(self.path).get("add_bos_token", adds)) and self.bos_id is not None

    # --- Public API. -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding table: the base vocabulary plus the added tokens."""
        return self.base_vocab_size + NUM_ADDED_TOKENS

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; literal `<image>`/`<|endofchunk|>` become their ids if `allow_special`.

        With allow_special=False (raw web text) those substrings are tokenized as ordinary text, and no id at
        or above base_vocab_size can come out, so untrusted text can never fake an image position.
        """
        if not allow_special:
            return [i for i in self._encode_plain(text) if i < self.base_vocab_size]
        ids: list[int] = []
        for part in _SPECIAL_RE.split(text):
            if part == IMAGE_TOKEN:
                ids.append(self.image_id)
            elif part == EOC_TOKEN:
                ids.append(self.eoc_id)
            elif part:
                ids.extend(i for i in self._encode_plain(part) if i < self.base_vocab_size)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, with the added tokens rendered as `<image>`/`<|endofchunk|>`; padding dropped."""
        out: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in ids):
            if i in (self.image_id, self.eoc_id):
                out.append(self._decode_plain(run))
                out.append(IMAGE_TOKEN if i == self.image_id else EOC_TOKEN)
                run = []
            elif i == self.pad_id:
                continue
            elif 0 <= i < self.base_vocab_size:
                run.append(i)
            else:
                raise ValueError(f"Token id {i} out of range [0, {self.vocab_size}).")
        out.append(self._decode_plain(run))
        return "".join(out)

    def _encode_plain(self, text: str) -> list[int]:
        if self._sp is not None:
            return list(self._sp.encode(text, out_type=int))
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def _decode_plain(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    # Grain worker processes receive the tokenizer by pickling: send the path, re-load on the other side.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "model_vocab_size": self.model_vocab_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state.get("model_vocab_size"))

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.path!r}, base_vocab_size={self.base_vocab_size}, image_id={self.image_id}, "
            f"eoc_id={self.eoc_id}, pad_id={self.pad_id}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"adds_bos={self.adds_bos})"
        )

    def check_model_ids(self, image_id: int, num_added: int, what: str = "the model") -> None:
        """Fails, naming both sides, unless this tokenizer's added ids are where the model's rows are: `<image>`
        at `image_id`, `<|endofchunk|>` after it, and pad a base-vocabulary id or the last added row."""
        problems = []
        if num_added != NUM_ADDED_TOKENS:
            problems.append(f"the model has {num_added} added rows (model.lm.num_added_tokens), not {NUM_ADDED_TOKENS}")
        if self.image_id != image_id:
            problems.append(f"{IMAGE_TOKEN} is id {self.image_id} in the tokenizer but {image_id} in {what}")
        if self.eoc_id != image_id + 1:
            problems.append(f"{EOC_TOKEN} is id {self.eoc_id} in the tokenizer but {image_id + 1} in {what}")
        if not (0 <= self.pad_id < image_id or self.pad_id == image_id + 2):
            problems.append(f"pad is id {self.pad_id} in the tokenizer; {what} has rows 0..{image_id + 2}")
        if problems:
            raise TokenizerError(f"Tokenizer {self.path!r} does not match {what}: " + "; ".join(problems))


def _hf_tokenizer_config(path: str) -> dict[str, Any]:
    """The `tokenizer_config.json` beside a tokenizer file, or {}."""
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return {}
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"Cannot read {cfg_path!r}: {e}") from e


def _hf_special_names(path: str) -> dict[str, str]:
    """Special-token names from a `tokenizer_config.json` beside `tokenizer.json`, if there is one."""
    cfg = _hf_tokenizer_config(path)
    names = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = cfg.get(key)
        if isinstance(value, dict):  # {"content": "<s>", ...} in newer files.
            value = value.get("content")
        if isinstance(value, str):
            names[key] = value
    return names
