"""HF BERT models (built and saved offline by `transformers`) load into our TextEncoder: same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import text_encoder as te
from flamingo_jax.pretrained import hf_bert, load

BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    type_vocab_size=2,
)


def _perturb(model: torch.nn.Module) -> None:
    # Off the init (unit norm scales, zero biases) so that no mapping mistake hides.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _save(kind: type, path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = kind(transformers.BertConfig(**BERT)).eval()
    _perturb(model)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("bert")
    return path, _save(transformers.BertModel, path)


def _inputs(seed: int, batch: int = 3, length: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ids and token types, and a padding mask with a random number (>= 2) of real tokens per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, BERT["vocab_size"], (batch, length))
    lens = rng.integers(2, length, batch)
    lens[0] = length
    mask = np.arange(length)[None] < lens[:, None]
    return ids, mask, rng.integers(0, BERT["type_vocab_size"], (batch, length))


def _hf(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, types: np.ndarray):
    with torch.no_grad():
        return model(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask.astype(np.int64)),
            token_type_ids=torch.as_tensor(types),
        )


def _ours(model: te.TextEncoder, ids, mask, types) -> tuple[np.ndarray, np.ndarray]:
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    return np.asarray(model(*args)), np.asarray(model.pooled(*args))


def test_matches_transformers(bert_dir):
    path, ref = bert_dir
    model = hf_bert.load_bert(path)
    assert model.cfg == te.TextConfig(
        vocab_size=99, num_layers=2, dim=32, num_heads=4, mlp_dim=64, max_len=40, type_vocab_size=2
    )
    ids, mask, types = _inputs(0)
    out = _hf(ref, ids, mask, types)
    hidden, pooled = _ours(model, ids, mask, types)
    want = out.last_hidden_state.numpy()
    assert hidden.shape == (3, 12, 32) and pooled.shape == (3, 32)
    # Real tokens only: HF does not promise anything about the states at padded positions.
    np.testing.assert_allclose(hidden[mask], want[mask], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["BertForMaskedLM", "BertForPreTraining"])
def test_prefixed_directories(kind, tmp_path):
    ref = _save(getattr(transformers, kind), tmp_path)
    with load.TensorReader(tmp_path) as reader:
        assert any(n.startswith("cls.") for n in reader.names) and "bert.embeddings.word_embeddings.weight" in reader
    ids, mask, types = _inputs(1)
    out = _hf(ref.bert, ids, mask, types)
    if kind == "BertForMaskedLM":  # saved without a pooler: cls pooling cannot load, mean pooling can
        assert not hasattr(out, "pooler_output") or out.pooler_output is None
        with pytest.raises(load.CheckpointError, match=r"'bert\.pooler\.dense\.weight'.*pool='mean'"):
            hf_bert.load_bert(tmp_path)
        model = hf_bert.load_bert(tmp_path, pool="mean")
        want = out.last_hidden_state.numpy()
        want_pooled = (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    else:
        model = hf_bert.load_bert(tmp_path)
        want_pooled = out.pooler_output.numpy()
    hidden, pooled = _ours(model, ids, mask, types)
    np.testing.assert_allclose(hidden[mask], out.last_hidden_state.numpy()[mask], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-5, rtol=0)


def test_mean_pool_ignores_the_pooler(bert_dir):
    path, ref = bert_dir
    model = hf_bert.load_bert(path, pool="mean")
    assert model.pooler is None
    ids, mask, types = _inputs(2)
    want = _hf(ref, ids, mask, types).last_hidden_state.numpy()
    np.testing.assert_allclose(
        _ours(model, ids, mask, types)[1], (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True), atol=1e-5
    )


def test_sharded_load_equals_single_device(bert_dir):
    path, _ = bert_dir
    single = dict(nnx.to_flat_state(nnx.state(hf_bert.load_bert(path))))
    # 99 vocab rows do not split over tensor=4 (an error under the default rules): replicate them here.
    rules = tuple((n, None) if n == "vocab" else (n, t) for n, t in sharding.DEFAULT_RULES)
    sharded = hf_bert.load_bert(path, mesh=sharding.make_mesh((1, 2, 4)), rules=rules)
    for p, var in nnx.to_flat_state(nnx.state(sharded)):
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(single[p][...]), err_msg=str(p))
    assert sharded.layers.q.kernel[...].addressable_shards[0].data.shape == (2, 16, 1, 8)  # embed/2, heads/4


def _copy(path: Path, dest: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors")
    (dest / "config.json").write_text((path / "config.json").read_text())


def test_unexpected_missing_and_misshaped_tensors_fail_by_name(bert_dir, tmp_path):
    path, _ = bert_dir
    cases = {
        "extra": (
            lambda t: t.update({"encoder.layer.1.attention.self.extra": np.ones(3, np.float32)}),
            r"unexpected tensors.*'encoder\.layer\.1\.attention\.self\.extra'",
        ),
        "missing": (
            lambda t: t.pop("encoder.layer.1.output.dense.bias"),
            r"'encoder\.layer\.1\.output\.dense\.bias'.*missing",
        ),
        "no_pooler": (lambda t: t.pop("pooler.dense.weight"), r"'pooler\.dense\.weight'.*missing"),
        "shape": (
            lambda t: t.update({"embeddings.position_embeddings.weight": np.ones((10, 32), np.float32)}),
            r"'embeddings\.position_embeddings\.weight' has shape \(10, 32\), expected shape \(40, 32\)",
        ),
    }
    for name, (edit, match) in cases.items():
        (tmp_path / name).mkdir()
        _copy(path, tmp_path / name, edit)
        with pytest.raises(load.CheckpointError, match=match):
            hf_bert.load_bert(tmp_path / name)


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(hidden_act="relu"), "hidden_act 'relu'"),
        (dict(position_embedding_type="relative_key"), "position_embedding_type 'relative_key'"),
        (dict(model_type="roberta"), "model_type 'roberta'"),
    ],
)
def test_unsupported_configs(bert_dir, tmp_path, override, match):
    path, _ = bert_dir
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **override}))
    with pytest.raises(load.CheckpointError, match=match):
        hf_bert.text_config_from_hf(tmp_path)


def test_gelu_new_maps_to_tanh_gelu(bert_dir, tmp_path):
    path, _ = bert_dir
    (tmp_path / "config.json").write_text(
        json.dumps({**json.loads((path / "config.json").read_text()), "hidden_act": "gelu_new"})
    )
    assert hf_bert.text_config_from_hf(tmp_path).activation == "gelu_tanh"


def test_stage1_starts_its_text_tower_from_a_bert_directory(bert_dir):
    import jax

    from flamingo_jax import train
    from tests.configs import tiny_contrastive_config

    path, torch_model = bert_dir
    c = tiny_contrastive_config()
    c.model.text_pretrained = str(path)
    mcfg = train.validate(c)  # the architecture comes from the directory's config.json
    assert (mcfg.text.dim, mcfg.text.num_layers, mcfg.text.vocab_size, mcfg.text.pool) == (32, 2, 99, "cls")
    tr = train.build(c, mcfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    state, frozen = train.init_state(tr)
    assert "text" in state["params"]  # it trains on from there
    ids, mask, _ = _inputs(5)
    got = jax.jit(lambda p, i, m: tr.parts.merge(p, frozen).text.pooled(i, m))(state["params"], ids, mask)
    with torch.no_grad():
        want = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
    np.testing.assert_allclose(np.asarray(got), want.pooler_output.numpy(), atol=1e-5)
