"""Export to safetensors + JSON + tokenizer, loading it back, and captioning with the KV cache."""

import json
import os
import pathlib
import struct
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageDraw

import flamingo_jax
from flamingo_jax import checkpoint, export, generate, sharding
from flamingo_jax import config as config_lib
from flamingo_jax.data.tokenizer import Tokenizer
from tests import checkpoint_helpers as h


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    _, ref, _ = h.shared_reference(tmp_path_factory)
    out = tmp_path_factory.mktemp("export")
    trained = export.export(ref, str(out / "trained"))
    full = export.export(ref, str(out / "full"), full=True)
    return ref, trained, full


def from_checkpoint(workdir: str) -> nnx.Module:
    """The model straight from the newest checkpoint: its parameters, and the frozen weights re-created."""
    src = checkpoint.pick(workdir)
    config = ml_collections.ConfigDict(src.meta["config"])
    mcfg = config_lib.model_config(config)
    mesh, rules = export._mesh(), sharding.rules_from_config(config.sharding.rules)
    lay = export.layout(mcfg, config.seed, mesh, rules)
    params = checkpoint.unflatten_like(
        checkpoint.read_params(src.manager, src.step, checkpoint.flatten(lay.params)), lay.params
    )
    return lay.parts.merge(params, export.init_frozen(mcfg, config.seed, mesh, rules, lay))


def sample(tok: Tokenizer, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    media = rng.integers(0, 256, (2, 1, 1, size, size, 3), dtype=np.uint8)
    ids = [tok.encode("<image>a red circle on white<|endofchunk|>"), tok.encode("<image>two blue squares")]
    n = max(map(len, ids))
    return media, np.array([i + [tok.pad_id] * (n - len(i)) for i in ids], np.int32)


@pytest.mark.slow
def test_export_then_load_gives_identical_logits(exported):
    ref, trained, full = exported
    direct = from_checkpoint(ref)
    graphdef, _ = nnx.split(direct)
    forward = jax.jit(lambda state, media, ids: nnx.merge(graphdef, state)(media, ids))
    models = {"trained": flamingo_jax.load_exported(trained), "full": flamingo_jax.load_exported(full)}
    media, ids = sample(models["full"].tokenizer, direct.cfg.vision.image_size)
    want = np.asarray(forward(nnx.state(direct), media, ids))
    assert np.isfinite(want).all() and want.std() > 0
    for name, ex in models.items():
        np.testing.assert_array_equal(np.asarray(forward(nnx.state(ex.model), media, ids)), want, err_msg=name)


@pytest.mark.slow
def test_exported_files_are_safetensors_json_and_tokenizer_only_no_pickle(exported):
    _, trained, full = exported
    sizes = {}
    for out in (trained, full):
        files = sorted(os.listdir(out))
        assert files == ["config.json", "model.safetensors", "tokenizer.model"]
        for name in files:
            head = pathlib.Path(out, name).read_bytes()[:16]
            assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), name  # pickle
            assert not head.startswith((b"PK\x03\x04", b"\x93NUMPY")), name  # torch zip / numpy .npy
        raw = pathlib.Path(out, "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        assert header.pop("__metadata__")["format"] == export.FORMAT
        assert max(t["data_offsets"][1] for t in header.values()) == len(raw) - 8 - n  # nothing else in the file
        from safetensors.numpy import load_file

        tensors = load_file(os.path.join(out, "model.safetensors"))  # the reference reader agrees
        assert set(tensors) == set(header)
        sizes[out] = set(tensors)
        json.loads(pathlib.Path(out, "config.json").read_text())
        Tokenizer.from_path(os.path.join(out, "tokenizer.model"))  # a SentencePiece protobuf
    assert all(k.startswith(("resampler/", "xattn/", "lm/embed/added", "lm/head/added")) for k in sizes[trained])
    assert {k.split("/")[0] for k in sizes[full] - sizes[trained]} == {"vision", "lm"}


@pytest.mark.slow
def test_greedy_decoding_with_the_cache_matches_the_full_forward_pass(exported):
    _, _, full = exported
    ex = flamingo_jax.load_exported(full)
    tok, size = ex.tokenizer, ex.model.cfg.vision.image_size
    media = generate.prepare_image(np.full((40, 30, 3), 200, np.uint8), size)
    prompt = tok.encode("<image>")
    dec = generate.Decoder(ex.model)
    new = generate.generate(dec, tok, media, prompt, beam=1, max_new_tokens=8)
    assert new and tok.eoc_id not in new
    logits = np.array(ex.model(media, np.array([prompt + new])))[0]
    logits[:, [tok.image_id, tok.pad_id]] = -np.inf
    assert list(logits[len(prompt) - 1 : -1].argmax(-1)) == new  # (beam search: the CLI test below)


@pytest.mark.slow
def test_generate_cli_captions_an_image(exported, tmp_path):
    _, _, full = exported
    im = Image.new("RGB", (80, 60), (255, 255, 255))
    ImageDraw.Draw(im).ellipse((20, 10, 60, 50), fill=(255, 0, 0))
    im.save(tmp_path / "a.jpg")
    cmd = [
        sys.executable,
        "-m",
        "flamingo_jax.generate",
        f"--model={full}",
        f"--image={tmp_path / 'a.jpg'}",
        "--prompt=<image>",
        "--beam=2",
        "--max_new_tokens=6",
    ]
    p = subprocess.run(cmd, env=h.env(devices=1), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    text = p.stdout.strip().splitlines()[-1]
    assert text.strip(), p.stdout


def test_safetensors_writer_roundtrips_every_dtype_it_writes(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    tensors = {
        "a/bf16": jax.numpy.asarray(rng.normal(size=(3, 5)), jax.numpy.bfloat16),
        "b/f32": rng.normal(size=(7,)).astype(np.float32),
        "c/i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "d/bool": np.array([True, False, True]),
        "e/scalar": np.float32(2.5),
        "f/empty": np.zeros((0, 4), np.float32),
    }
    export.write_safetensors(str(tmp_path / "t.safetensors"), tensors, {"k": "v"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        v = np.asarray(v)
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v)
