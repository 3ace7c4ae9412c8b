"""`model.lm_pretrained` through the trainer: a Flamingo initialised on an HF LM reproduces that LM's logits."""

import jax
import numpy as np
import torch
import transformers

from flamingo_jax import sharding, train
from tests.configs import tiny_train_config


def test_trainer_init_loads_hf_lm_into_flamingo(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    ).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    hf.save_pretrained(tmp_path)

    config = tiny_train_config()
    config.model.lm_pretrained = str(tmp_path)
    mcfg = train.validate(config)
    assert (mcfg.lm.num_layers, mcfg.lm.dim, mcfg.lm.kv_heads, mcfg.lm.vocab_size) == (3, 32, 2, 64)
    mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
    tr = train.build(config, mcfg, mesh)
    state, frozen = train.init_state(tr)

    # Frozen LM weights are HF's; the added token rows (trainable) start at the mean embedding.
    want_q = hf.model.layers[1].self_attn.q_proj.weight.detach().numpy().T.reshape(32, 4, 8)
    np.testing.assert_allclose(np.asarray(frozen["lm"]["layers"]["attn"]["q"]["kernel"][1]), want_q, atol=1e-6)
    added = np.asarray(state["params"]["lm"]["embed"]["added"])
    np.testing.assert_allclose(added[0], hf.model.embed_tokens.weight.detach().numpy().mean(0), atol=1e-6)

    model = tr.parts.merge(state["params"], frozen)
    ids = np.random.default_rng(0).integers(0, 64, (2, 9))
    media = np.zeros((2, 1, 1, 32, 32, 3), np.uint8)
    got = np.asarray(model(media, ids))[..., :64]
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Bring your own towers: special ids, random towers and preprocessing come from the towers' files, or fail at start.
import json  # noqa: E402

import pytest  # noqa: E402
import tokenizers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from tokenizers import models as tok_models  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

from flamingo_jax import config as config_lib  # noqa: E402
from flamingo_jax.data import synthetic  # noqa: E402
from flamingo_jax.data.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from flamingo_jax.models import flamingo  # noqa: E402
from flamingo_jax.pretrained import hf_clip, nfnet_convert, towers  # noqa: E402

WORDS = ["[UNK]", "<|endoftext|>", "a", "the", *synthetic.SHAPES, *synthetic.COLOURS]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.prepare_synthetic(root, num_train=32, num_eval=8, image_size=32)
    return root


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    """A Qwen2-style pair: the LM's embedding has 64 rows, its tokenizer (with `<|endoftext|>` as EOS and pad)
    far fewer entries."""
    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    eos = WORDS.index("<|endoftext|>")
    hf = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=eos,
            eos_token_id=eos,
        )
    )
    hf.save_pretrained(path)
    tok = tokenizers.Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    )
    return path


def _demo_like(root: str):
    from configs import demo

    c = demo.get_config(root)
    c.data.synthetic.update(num_train=32, num_eval=8, image_size=32)
    c.model.trainable = (".*",)  # no stage-1 encoder here: the tiny run trains its random NFNet
    c.data.datasets = {"ltip": c.data.datasets["ltip"]}
    c.data.datasets.ltip.update(batch_size=8, seq_len=16)
    c.model.vision.update(widths=(16, 16, 32, 32), stem_widths=(4, 8, 8), group_size=8, image_size=32)
    c.model.resampler.update(num_layers=1, num_latents=4, num_heads=2, head_dim=8)
    c.model.xattn.update(every=2, num_heads=2, head_dim=8, ffw_mult=2)
    c.train.update(steps=2, log_every=1, eval_every=2, eval_batches=1)
    c.checkpoint.every_steps = 0
    return c


def test_padded_vocabulary_lm_sees_its_images(qwen_pair, data_root, tmp_path):
    config = _demo_like(data_root)
    config.data.synthetic.enabled = False
    config.data.tokenizer = str(qwen_pair / "tokenizer.json")
    config.model.lm_pretrained = str(qwen_pair)
    # The old trap: a vocab_size equal to the tokenizer's size passed the tokenizer check, while the model took 64
    # rows from config.json and looked for `<image>` at id 64, which no token ever had.
    config.model.lm = dict(config.model.lm, vocab_size=len(WORDS))
    config.model.trainable = flamingo.DEFAULT_TRAINABLE
    config.model.allow_random_towers = True  # the vision encoder; the LM is pretrained
    mcfg = train.validate(config)
    assert mcfg.image_token_id == 64
    tok = train.make_tokenizer(config, mcfg)
    assert (tok.image_id, tok.pad_id, tok.own_vocab_size) == (64, 1, len(WORDS))
    final = train.train(config, str(tmp_path))
    # Images reach the LM: with the images shuffled across examples the loss changes.
    assert abs(final["eval/loss_shuffled_images"] - final["eval/loss"]) > 1e-6


def test_frozen_random_towers_fail_at_start_naming_the_fields(tmp_path):
    config = tiny_train_config()
    config.model.allow_random_towers = False
    with pytest.raises(ValueError, match=r"model\.lm_pretrained is empty.*model\.vision_pretrained is empty"):
        train.train(config, str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing was written: no compute happened


def test_tokenizer_that_disagrees_with_the_lm_fails_naming_both(qwen_pair, tmp_path):
    config = tiny_train_config()
    config.model.lm_pretrained = str(qwen_pair)
    mcfg = config_lib.model_config(config)
    good = Tokenizer.from_path(qwen_pair / "tokenizer.json", model_vocab_size=64)
    towers.check_tokenizer(good, mcfg)
    other = tmp_path / "other"
    other.mkdir()
    words = ["[UNK]", "</s>", "<s>", *WORDS[1:]]
    tok = tokenizers.Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.save(str(other / "tokenizer.json"))
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    wrong = Tokenizer.from_path(other / "tokenizer.json", model_vocab_size=64)
    with pytest.raises(TokenizerError, match=r"end of sequence is id 3 in the tokenizer but eos_token_id=\[1\]"):
        towers.check_tokenizer(wrong, mcfg)
    unplaced = Tokenizer.from_path(qwen_pair / "tokenizer.json")  # opened without the model: <image> at 16
    with pytest.raises(TokenizerError, match=r"<image> is id 16 in the tokenizer but 64 in the model"):
        towers.check_tokenizer(unplaced, mcfg)


def test_vision_settings_come_from_the_towers_files(tmp_path):
    # A converted NFNet: its activation and statistics are in the file's metadata.
    arch = dict(widths=[16, 16, 32, 32], depths=[1, 1, 1, 1], stem_widths=[4, 8, 8], group_size=8)
    meta = dict(
        format=nfnet_convert.FORMAT,
        architecture=json.dumps(arch),
        activation="scaled_gelu_tanh",
        image_mean=json.dumps([0.5, 0.5, 0.5]),
        image_std=json.dumps([0.25, 0.25, 0.25]),
    )
    nf = tmp_path / "nfnet.safetensors"
    save_file({"stem/0/kernel": np.zeros((3, 3, 3, 4), np.float32)}, str(nf), metadata=meta)
    config = tiny_train_config()
    config.model.vision_pretrained = str(nf)
    v = config_lib.model_config(config).vision
    assert (v.activation, v.mean, v.std) == ("scaled_gelu_tanh", (0.5,) * 3, (0.25,) * 3)
    assert (v.widths, v.stem_widths, v.group_size) == ((16, 16, 32, 32), (4, 8, 8), 8)
    config.model.vision.kind = "clip_vit"
    with pytest.raises(ValueError, match=r"is a file \(a converted NFNet\) but model\.vision\.kind='clip_vit'"):
        config_lib.model_config(config)

    # An HF CLIP tower: architecture, activation and eps from config.json, statistics from preprocessor_config.json.
    clip = tmp_path / "clip"
    transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
        )
    ).save_pretrained(clip)
    config.model.vision_pretrained = str(clip)
    v = config_lib.model_config(config).vision
    assert (v.activation, v.norm_eps, v.image_size, v.width) == ("gelu", 1e-6, 32, 32)
    assert (v.mean, v.std) == (hf_clip.CLIP_MEAN, hf_clip.CLIP_STD)  # not ImageNet's
    (clip / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    assert config_lib.model_config(config).vision.mean == (0.5,) * 3
    # A CLIP config without weights uses CLIP's statistics too.
    assert flamingo.VisionConfig(kind="clip_vit").mean == hf_clip.CLIP_MEAN
