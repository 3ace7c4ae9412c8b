"""HF-format LMs (built and saved offline by `transformers`) load into DecoderLM with matching logits."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from flamingo_jax import sharding
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.pretrained import hf_lm, load

VOCAB = 64

CONFIGS = {
    # GQA (8 query heads, 4 key/value heads), untied head, multi-shard safetensors with an index.
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
    ),
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32),
}


def _llama_long(**rope) -> transformers.LlamaConfig:
    """head_dim 16, one kv head; rope scaled from 64 pretraining positions to 256."""
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_parameters=rope,
    )


# RoPE scalings (transformers 5 writes them to config.json as `rope_parameters`).
SCALED = {
    # head_dim 16, theta 1e4: wavelengths 2*pi*10^(i/2) fall below, within and above the 16..64 band.
    "llama3": lambda: _llama_long(
        rope_type="llama3",
        rope_theta=10000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
    # theta 100: the correction range is dims 0..5 of 8, so the ramp between them is exercised.
    "yarn": lambda: _llama_long(rope_type="yarn", rope_theta=100.0, factor=4.0, original_max_position_embeddings=64),
    "linear": lambda: _llama_long(rope_type="linear", rope_theta=10000.0, factor=4.0),
}
CONFIGS_ALL = {**CONFIGS, **SCALED}
MODELS = {
    "llama_gqa": transformers.LlamaForCausalLM,
    "llama_tied": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
    **dict.fromkeys(SCALED, transformers.LlamaForCausalLM),
}


def _save(kind: str, path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[kind](CONFIGS_ALL[kind]()).eval()
    # Move every weight off its init (norm scales of one, zero biases) so that no mapping mistake hides.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path, max_shard_size="20KB" if kind == "llama_gqa" else "1GB")
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    out = {}
    for kind in CONFIGS_ALL:
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (path, _save(kind, path))
    return out


IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
LONG_IDS = np.random.default_rng(1).integers(0, VOCAB, (2, 80))  # past the 64 pretraining positions


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_match_transformers(saved, kind):
    path, ref = saved[kind]
    if kind == "llama_gqa":
        assert len(list(path.glob("*.safetensors"))) > 1  # exercises the sharded-file index
    model = hf_lm.load_lm(path)
    with torch.no_grad():
        want = ref(torch.as_tensor(IDS)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got, _ = model(jnp.asarray(IDS))
    got = np.asarray(got)
    assert got.shape == (2, 11, VOCAB + 3)
    np.testing.assert_allclose(got[..., :VOCAB], want, atol=1e-4, rtol=0)

    # The added rows start as the mean of the pretrained rows.
    emb = np.asarray(model.embed.base[...])
    np.testing.assert_allclose(np.asarray(model.embed.added[...]), np.repeat(emb.mean(0)[None], 3, 0), atol=1e-6)
    if model.head is not None:
        head = np.asarray(model.head.base[...])
        np.testing.assert_allclose(np.asarray(model.head.added[...]), np.repeat(head.mean(1)[:, None], 3, 1), atol=1e-6)


def test_config_fields(saved):
    cfg = hf_lm.lm_config_from_hf(saved["llama_gqa"][0])
    assert (cfg["num_heads"], cfg["num_kv_heads"], cfg["rope_theta"], cfg["tie_embeddings"]) == (
        8,
        4,
        5000.0,
        False,
    )
    qwen = hf_lm.lm_config_from_hf(saved["qwen2"][0])
    assert cfg["rope_scaling"] == {}
    assert qwen["family"] == "llama" and qwen["qkv_bias"] and not qwen["out_bias"]
    gpt2 = hf_lm.lm_config_from_hf(saved["gpt2"][0])
    assert (gpt2["family"], gpt2["mlp_act"], gpt2["max_len"], gpt2["tie_embeddings"]) == (
        "gpt2",
        "gelu_tanh",
        32,
        True,
    )


@pytest.mark.parametrize("kind", list(SCALED))
def test_rope_scaling_logits_match_transformers(saved, kind):
    path, ref = saved[kind]
    model = hf_lm.load_lm(path)
    assert dict(model.cfg.rope_scaling)["rope_type"] == kind
    with torch.no_grad():
        want = ref(torch.as_tensor(LONG_IDS)).logits.numpy()
    forward = nnx.jit(lambda m, ids: m(ids)[0][..., :VOCAB])
    got = np.asarray(forward(model, jnp.asarray(LONG_IDS)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The same weights without the scaling are far off: the test sees the scaling.
    unscaled = dataclasses.replace(model.cfg, rope_scaling=())
    plain = nnx.merge(
        nnx.graphdef(nnx.eval_shape(lambda: lm_lib.DecoderLM(unscaled, rngs=nnx.Rngs(0)))), nnx.state(model)
    )
    assert np.max(np.abs(np.asarray(forward(plain, jnp.asarray(LONG_IDS)))[:, 64:] - want[:, 64:])) > 1e-2


def _edit_config(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    hf = json.loads((src / "config.json").read_text())
    edit(hf)
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


def test_rope_scaling_read_from_transformers_5_and_4_configs(saved, tmp_path):
    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    v5 = hf_lm.lm_config_from_hf(saved["yarn"][0])
    assert (v5["rope_theta"], v5["rope_scaling"]) == (100.0, yarn)

    def v4(hf):  # transformers 4.x: top-level rope_theta, `rope_scaling` with the old `type` key, unset values
        hf.pop("rope_parameters")
        hf.update(rope_theta=100.0, rope_scaling=dict(type="yarn", factor=4.0, attention_factor=None))

    v4_cfg = hf_lm.lm_config_from_hf(_edit_config(saved["yarn"][0], tmp_path / "v4", v4))
    # original_max_position_embeddings defaults to max_position_embeddings, as in transformers.
    assert (v4_cfg["rope_theta"], v4_cfg["rope_scaling"]) == (100.0, dict(yarn, original_max_position_embeddings=256))
    lm_lib.LMConfig.from_dict(v4_cfg).validate("model.lm")


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=64),
        dict(rope_type="dynamic", factor=2.0),
        dict(rope_type="mystery", factor=2.0),
    ],
)
def test_unsupported_rope_type_fails_naming_it(saved, tmp_path, rope):
    def edit(hf):
        hf["rope_parameters"] = dict(rope, rope_theta=10000.0)

    path = _edit_config(saved["linear"][0], tmp_path / "cfg", edit)
    supported = re.escape("supported: ['default', 'linear', 'llama3', 'yarn']")
    with pytest.raises(ValueError, match=rf"rope_type '{rope['rope_type']}' is not supported.*{supported}"):
        hf_lm.lm_config_from_hf(path)


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
def test_sharded_load_equals_single_device(saved, kind, monkeypatch):
    path, _ = saved[kind]
    mesh = sharding.make_mesh((1, 2, 4))
    single = nnx.state(hf_lm.load_lm(path))

    reads: dict[str, list[int]] = {}
    real_read = load.TensorReader.read

    def spy(self, name, idx):
        block = real_read(self, name, idx)
        reads.setdefault(name, []).append(block.size)
        return block

    monkeypatch.setattr(load.TensorReader, "read", spy)
    sharded = nnx.state(hf_lm.load_lm(path, mesh=mesh, rules=sharding.DEFAULT_RULES))
    # Each device's callback reads only its block: 1/8 of a q projection (embed over fsdp=2, heads over
    # tensor=4), never the whole tensor.
    qname = next(n for n in reads if n.endswith(("q_proj.weight", "c_attn.weight")))
    assert max(reads[qname]) == 32 * 32 // 8
    flat_single = dict(nnx.to_flat_state(single))
    split = 0
    for p, var in nnx.to_flat_state(sharded):
        arr = var[...]
        assert arr.sharding.mesh.shape == mesh.shape
        split += any(s is not None for s in arr.sharding.spec)
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(flat_single[p][...]), err_msg=str(p))
    assert split >= 5  # q/k/v/o/mlp kernels and the embedding are really split across devices
    q = sharded["layers"]["attn"]["q"]["kernel"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, q.shape[2] // 4, q.shape[3])


def _rewrite(src: Path, dst: Path, edit) -> None:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")


def test_missing_mismatched_and_extra_tensors_fail_by_name(saved, tmp_path):
    src, _ = saved["llama_tied"]
    name = "model.layers.1.self_attn.k_proj.weight"

    _rewrite(src, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(load.CheckpointError, match=rf"{name}.*expected shape \(32, 32\)"):
        hf_lm.load_lm(tmp_path / "missing")

    def shrink(t):
        t[name] = t[name][:16]

    _rewrite(src, tmp_path / "mismatch", shrink)
    with pytest.raises(load.CheckpointError, match=rf"{name}.*shape \(16, 32\), expected shape \(32, 32\)"):
        hf_lm.load_lm(tmp_path / "mismatch")

    def extra(t):
        t["model.layers.0.self_attn.mystery"] = np.zeros((3,), np.float32)

    _rewrite(src, tmp_path / "extra", extra)
    with pytest.raises(load.CheckpointError, match=r"unexpected tensors.*model.layers.0.self_attn.mystery"):
        hf_lm.load_lm(tmp_path / "extra")


def test_bfloat16_checkpoint_casts_to_param_dtype(saved, tmp_path):
    src, _ = saved["gpt2"]
    _rewrite(src, tmp_path / "bf16", lambda t: t.update({k: v.astype(jnp.bfloat16) for k, v in t.items()}))
    model = hf_lm.load_lm(tmp_path / "bf16", param_dtype=jnp.float32)
    ref = hf_lm.load_lm(src, param_dtype=jnp.bfloat16)
    assert model.embed.base[...].dtype == jnp.float32 and ref.embed.base[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(model.layers.attn.q.kernel[...]),
        np.asarray(ref.layers.attn.q.kernel[...].astype(jnp.float32)),
    )
