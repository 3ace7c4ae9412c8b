"""HF CLIP vision towers (built and saved offline by `transformers`) load into our ViT: same features."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import vit
from flamingo_jax.pretrained import hf_clip, load

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def _perturb(model: torch.nn.Module) -> None:
    # Off the init (unit norm scales, zero biases) so that no mapping mistake hides.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    _perturb(model)
    path = tmp_path_factory.mktemp("clip_vision")
    model.save_pretrained(path)
    return path, model


IMAGES = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)


def _hf(model: torch.nn.Module, images: np.ndarray):
    with torch.no_grad():
        return model(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)))


def test_features_match_last_hidden_state(vision_dir):
    path, ref = vision_dir
    model = hf_clip.load_clip_vision(path)
    assert model.cfg == vit.ViTConfig(image_size=32, patch_size=8, width=32, num_layers=2, num_heads=4, mlp_dim=64)
    out = _hf(ref, IMAGES)
    feats = np.asarray(model.features(jnp.asarray(IMAGES)))
    assert feats.shape == (2, 17, 32)
    np.testing.assert_allclose(feats, out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        np.asarray(model.pooled(jnp.asarray(IMAGES))), out.pooler_output.numpy(), atol=1e-4, rtol=0
    )
    patches = np.asarray(model.features(jnp.asarray(IMAGES), cls_token=False, post_norm=True))
    assert patches.shape == (2, 16, 32)


def test_full_clip_model_directory(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        vision_config=VISION,
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=50,
            max_position_embeddings=16,
        ),
        projection_dim=8,
    )
    ref = transformers.CLIPModel(cfg).eval()
    _perturb(ref)
    ref.save_pretrained(tmp_path)
    model = hf_clip.load_clip_vision(tmp_path)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=torch.as_tensor(IMAGES.transpose(0, 3, 1, 2))).last_hidden_state
    np.testing.assert_allclose(np.asarray(model.features(jnp.asarray(IMAGES))), want.numpy(), atol=1e-4, rtol=0)


def test_sharded_load_equals_single_device(vision_dir):
    path, _ = vision_dir
    single = dict(nnx.to_flat_state(nnx.state(hf_clip.load_clip_vision(path))))
    mesh = sharding.make_mesh((1, 2, 4))
    sharded = hf_clip.load_clip_vision(path, mesh=mesh, rules=sharding.DEFAULT_RULES, param_dtype=jnp.float32)
    for p, var in nnx.to_flat_state(nnx.state(sharded)):
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(single[p][...]), err_msg=str(p))
    q = sharded.layers.q.kernel[...]
    assert q.addressable_shards[0].data.shape == (2, 32, 1, 8)  # heads split over tensor=4


def test_mismatched_tensor_fails_by_name(vision_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = vision_dir
    tensors = load_file(path / "model.safetensors")
    tensors["embeddings.position_embedding.weight"] = tensors["embeddings.position_embedding.weight"][:10]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(
        load.CheckpointError,
        match=r"embeddings.position_embedding.weight.*shape \(10, 32\), expected shape \(17, 32\)",
    ):
        hf_clip.load_clip_vision(tmp_path)
