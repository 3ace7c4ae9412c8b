"""Tokenizer: added-token layout, special-token parsing, errors that name the path."""

import io
import json
import pickle

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import models, pre_tokenizers

from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.data.tokenizer import NUM_ADDED_TOKENS, Tokenizer, TokenizerError

TEXT = ["a red circle at the top left", "two blue squares in the center", "a green triangle moves up"] * 20


def _sp_model(path, **kwargs):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT),
        model_writer=model,
        vocab_size=60,
        hard_vocab_limit=False,
        model_type="bpe",
        minloglevel=2,
        **({"pad_id": -1} | kwargs),
    )
    path.write_bytes(model.getvalue())
    return str(path)


def _hf_json(path, tokens, specials=()):
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if specials:
        tok.add_special_tokens(list(specials))
    tok.save(str(path))
    return str(path)


def test_sentencepiece_layout_and_roundtrip(tmp_path):
    tok = Tokenizer.from_path(_sp_model(tmp_path / "t.model"))
    n = tok.base_vocab_size
    assert NUM_ADDED_TOKENS == 3 and tok.vocab_size == n + 3
    assert (tok.image_id, tok.eoc_id, tok.pad_id) == (n, n + 1, n + 2)
    assert tok.bos_id == 1 and tok.eos_id == 2
    ids = tok.encode("<image>a red circle<|endofchunk|><image>two blue squares<|endofchunk|>")
    assert ids[0] == tok.image_id and ids.count(tok.image_id) == 2 and ids.count(tok.eoc_id) == 2
    assert all(i < n for i in ids if i not in (tok.image_id, tok.eoc_id))
    assert tok.decode(ids) == "<image>a red circle<|endofchunk|><image>two blue squares<|endofchunk|>"
    assert tok.decode([*ids, tok.pad_id, tok.pad_id]) == tok.decode(ids)  # Padding renders as nothing.
    # Untrusted text cannot fake an image position.
    raw = tok.encode("look <image> here", allow_special=False)
    assert raw and all(i < n for i in raw)
    with pytest.raises(ValueError):
        tok.decode([n + 3])


def test_sentencepiece_own_pad(tmp_path):
    tok = Tokenizer.from_path(_sp_model(tmp_path / "t.model", pad_id=3))
    assert tok.pad_id == 3 and tok.image_id == tok.base_vocab_size


def test_sentencepiece_defining_image_token_is_ambiguous(tmp_path):
    path = _sp_model(tmp_path / "t.model", user_defined_symbols=["<image>"])
    with pytest.raises(TokenizerError, match=r"t\.model"):
        Tokenizer.from_path(path)


def test_missing_and_garbage_files_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=r"nothere\.model"):
        Tokenizer.from_path(tmp_path / "nothere.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"bad\.model"):
        Tokenizer.from_path(tmp_path / "bad.model")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"bad\.json"):
        Tokenizer.from_path(tmp_path / "bad.json")


def test_no_eos_is_an_error(tmp_path):
    path = _sp_model(tmp_path / "t.model", eos_id=-1)
    with pytest.raises(TokenizerError, match="end-of-sequence"):
        Tokenizer.from_path(path)


def test_hf_tokenizer_json(tmp_path):
    words = ["[UNK]", "<pad>", "</s>", "a", "red", "circle", "two", "blue", "squares"]
    tok = Tokenizer.from_path(_hf_json(tmp_path / "tokenizer.json", words))
    assert tok.base_vocab_size == len(words)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (1, 2, None)  # Its own pad, not base + 2.
    assert (tok.image_id, tok.eoc_id) == (9, 10)
    ids = tok.encode("<image>a red circle<|endofchunk|>")
    assert ids == [9, 3, 4, 5, 10]
    assert tok.decode(ids) == "<image>a red circle<|endofchunk|>"


def test_hf_tokenizer_config_names_specials(tmp_path):
    words = ["[UNK]", "<s>", "<end>", "a", "red"]
    path = _hf_json(tmp_path / "tokenizer.json", words)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>"}}))
    tok = Tokenizer.from_path(path)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, len(words) + 2)


def test_hf_with_specials_already_appended_is_accepted(tmp_path):
    words = ["[UNK]", "</s>", "a", "red"]
    path = _hf_json(tmp_path / "tokenizer.json", words, specials=["<image>", "<|endofchunk|>", "<pad>"])
    tok = Tokenizer.from_path(path)
    assert (tok.base_vocab_size, tok.image_id, tok.eoc_id, tok.pad_id) == (4, 4, 5, 6)
    assert tok.encode("<image>a red<|endofchunk|>") == [4, 2, 3, 5]
    assert tok.encode("<image>a", allow_special=False) == [2]


def test_hf_with_specials_elsewhere_is_ambiguous(tmp_path):
    words = ["[UNK]", "</s>", "<image>", "a", "red"]
    path = _hf_json(tmp_path / "tokenizer.json", words)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_path(path)


def test_pickles_as_its_path(tmp_path):
    tok = Tokenizer.from_path(_sp_model(tmp_path / "t.model"))
    blob = pickle.dumps(tok)
    assert len(blob) < 500  # The path, not the model.
    tok2 = pickle.loads(blob)
    assert tok2.encode("a red circle<image>") == tok.encode("a red circle<image>")
    assert tokenizer_lib.IMAGE_TOKEN == "<image>" and tokenizer_lib.EOC_TOKEN == "<|endofchunk|>"


def _hf_llama_style(tmp_path, tokens, *, template: bool, config: dict | None = None):
    """A word-level tokenizer.json whose post-processor prepends `<s>` (LLaMA's template) or not (Qwen2's)."""
    from tokenizers import processors

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def test_bos_follows_the_tokenizers_own_files(tmp_path):
    words = ["[UNK]", "<s>", "</s>", "a", "red", "circle"]
    (tmp_path / "llama").mkdir()
    (tmp_path / "qwen").mkdir()
    (tmp_path / "off").mkdir()
    llama = Tokenizer.from_path(_hf_llama_style(tmp_path / "llama", words, template=True))
    assert llama.adds_bos and llama.bos_id == 1
    qwen = Tokenizer.from_path(_hf_llama_style(tmp_path / "qwen", words, template=False))
    assert not qwen.adds_bos and qwen.bos_id == 1  # has a BOS token, but was never trained with it prepended
    off = Tokenizer.from_path(_hf_llama_style(tmp_path / "off", words, template=True, config={"add_bos_token": False}))
    assert not off.adds_bos  # tokenizer_config.json overrides the template, as in transformers
    sp = Tokenizer.from_path(_sp_model(tmp_path / "t.model"))
    assert not sp.adds_bos and sp.bos_id is not None


def test_added_tokens_go_after_the_models_padded_rows(tmp_path):
    words = ["[UNK]", "<|endoftext|>", "a", "red", "circle"]
    path = _hf_json(tmp_path / "tok.json", words)
    tok = Tokenizer.from_path(path, model_vocab_size=16)  # e.g. Qwen2: 151,665 entries, 151,936 rows
    assert (tok.own_vocab_size, tok.base_vocab_size) == (5, 16)
    assert (tok.image_id, tok.eoc_id) == (16, 17)
    ids = tok.encode("<image>a red circle<|endofchunk|>")
    assert ids[0] == 16 and ids[-1] == 17 and all(i < 5 for i in ids[1:-1])
    tok.check_model_ids(16, NUM_ADDED_TOKENS)
    assert pickle.loads(pickle.dumps(tok)).image_id == 16  # Grain workers see the same ids
    with pytest.raises(TokenizerError, match=r"id 5 in the tokenizer but 16"):
        Tokenizer.from_path(path).check_model_ids(16, NUM_ADDED_TOKENS)
    with pytest.raises(TokenizerError, match=r"has 5 ids but the model's embedding has 4 rows.*model\.lm\.vocab_size"):
        Tokenizer.from_path(path, model_vocab_size=4)


def test_image_token_saved_at_another_id_than_the_models_fails(tmp_path):
    path = _hf_json(tmp_path / "tok.json", ["[UNK]", "</s>", "a"], specials=["<image>", "<|endofchunk|>"])
    assert Tokenizer.from_path(path, model_vocab_size=3).image_id == 3
    with pytest.raises(TokenizerError, match=r"defines '<image>' at id 3, but the model puts it at id 8"):
        Tokenizer.from_path(path, model_vocab_size=8)
