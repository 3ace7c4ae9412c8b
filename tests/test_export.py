"""Export to sharded safetensors + index + JSON + tokenizer, loading it back on any mesh, and captioning with the
KV cache (on one device and on a mesh).

The reference run trains on mesh (2, 2, 2) (tests/checkpoint_helpers.py), so the exports below are written from
an 8-device mesh with most parameters split into slices. tests/launch/test_multihost_export.py exports from two
processes.
"""

import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
from typing import NamedTuple

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
from flamingo_jax.models import flamingo as flamingo_model
from tests import checkpoint_helpers as h

FILE_CAP = 16 * 1024  # bytes: the trainable-only export spreads over several files per process


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both exports from the training config's mesh, (2, 2, 2) on the 8 test devices."""
    _, ref, _ = h.shared_reference(tmp_path_factory)
    out = tmp_path_factory.mktemp("export")
    trained = export.export(ref, str(out / "trained"), max_file_bytes=FILE_CAP)
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


@pytest.fixture(scope="module")
def reference(exported):
    """The checkpointed model on one device, a forward function, a sample batch and the model's logits on it."""
    direct = from_checkpoint(exported[0])
    graphdef, _ = nnx.split(direct)
    forward = jax.jit(lambda state, media, ids: nnx.merge(graphdef, state)(media, ids))
    media, ids = sample(Tokenizer.from_path(os.path.join(exported[2], "tokenizer.model")), direct.cfg.vision.image_size)
    want = np.asarray(forward(nnx.state(direct), media, ids))
    assert np.isfinite(want).all() and want.std() > 0
    return direct, forward, media, ids, want


def assert_same_params(model: nnx.Module, direct: nnx.Module) -> None:
    got, want = checkpoint.flatten(nnx.to_pure_dict(nnx.state(model))), nnx.to_pure_dict(nnx.state(direct))
    want = checkpoint.flatten(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


@pytest.mark.slow
def test_export_then_load_gives_identical_logits(exported, reference):
    _, trained, full = exported
    _, forward, media, ids, want = reference
    models = {"trained": flamingo_jax.load_exported(trained), "full": flamingo_jax.load_exported(full)}
    for name, ex in models.items():
        np.testing.assert_array_equal(np.asarray(forward(nnx.state(ex.model), media, ids)), want, err_msg=name)


@pytest.mark.slow
def test_sharded_export_loads_onto_another_mesh(exported, reference):
    """Written from (2, 2, 2), read onto (1, 4, 2): every device's block is cut from the stored slices. The
    parameters are bit for bit the checkpoint's; logits computed sharded agree to float rounding, and the same
    parameters gathered onto one device give the checkpoint's logits exactly."""
    _, _, full = exported
    direct, forward, media, ids, want = reference
    mesh = export._mesh((1, 4, 2))
    ex = flamingo_jax.load_exported(full, mesh=mesh)
    state = nnx.state(ex.model)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state)}
    assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(state))
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
    assert_same_params(ex.model, direct)
    np.testing.assert_allclose(np.asarray(forward(state, media, ids)), want, rtol=1e-5, atol=1e-5)
    one = jax.device_put(state, jax.devices()[0])
    np.testing.assert_array_equal(np.asarray(forward(one, media, ids)), want)


def model_paths(out: str) -> set[str]:
    """Every parameter the export should hold, from its config.json."""
    doc = json.loads(pathlib.Path(out, "config.json").read_text())
    mcfg = flamingo_model.FlamingoConfig.from_dict(doc["model"])
    lay = export.layout(mcfg, doc["seed"], export._mesh(), sharding.rules_from_config(doc["sharding_rules"]))
    paths = set(checkpoint.flatten(lay.params))
    return paths | set(checkpoint.flatten(lay.frozen)) if doc["contents"] == "full" else paths


@pytest.mark.slow
def test_index_covers_every_parameter_exactly(exported):
    from safetensors import safe_open

    _, trained, full = exported
    for out in (trained, full):
        index = json.loads(pathlib.Path(out, export.INDEX_FILE).read_text())
        params = index["parameters"]
        assert set(params) == model_paths(out)
        files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
        n = len(files)
        assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
        entries: dict[str, dict[str, tuple]] = {f: {} for f in files}
        for name, p in params.items():
            count = np.zeros(p["shape"], np.int32)  # how often each element is stored
            for sl in p["slices"]:
                assert index["weight_map"][sl["entry"]] == sl["file"]
                assert sl["entry"] == (
                    name if len(p["slices"]) == 1 else export.slice_entry(name, sl["start"], sl["stop"])
                )
                count[tuple(slice(a, b) for a, b in zip(sl["start"], sl["stop"]))] += 1
                entries[sl["file"]][sl["entry"]] = ([b - a for a, b in zip(sl["start"], sl["stop"])], p["dtype"])
            assert (count == 1).all(), name
        assert set(index["weight_map"]) == {e for f in entries.values() for e in f}
        total = 0
        for file, want in entries.items():
            with safe_open(os.path.join(out, file), framework="numpy") as f:
                assert set(f.keys()) == set(want), file
                for e, (shape, dtype) in want.items():
                    x = f.get_tensor(e)
                    assert list(x.shape) == shape and x.dtype == np.dtype(dtype), e
                    total += x.nbytes
        assert index["metadata"]["total_size"] == total
        assert index["metadata"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
        assert any("[" in e for e in index["weight_map"]), "nothing sharded: the test mesh should split parameters"
    assert len([f for f in os.listdir(trained) if f.endswith(".safetensors")]) > 2  # the size cap: several files


def broken_copy(src: str, dst: pathlib.Path) -> tuple[pathlib.Path, dict]:
    shutil.copytree(src, dst)
    return dst, json.loads((dst / export.INDEX_FILE).read_text())


@pytest.mark.slow
def test_missing_or_damaged_shard_fails_naming_it(exported, tmp_path):
    _, _, full = exported
    files = sorted(f for f in os.listdir(full) if f.endswith(".safetensors"))
    out, _ = broken_copy(full, tmp_path / "missing")
    (out / files[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(files[-1])):
        flamingo_jax.load_exported(str(out))

    out, _ = broken_copy(full, tmp_path / "truncated")
    raw = (out / files[0]).read_bytes()
    (out / files[0]).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=re.escape(files[0])):
        flamingo_jax.load_exported(str(out))

    out, index = broken_copy(full, tmp_path / "no_entry")  # the index names a tensor its file lacks
    name, p = next((n, p) for n, p in index["parameters"].items() if len(p["slices"]) > 1)
    sl = p["slices"][0]
    sl["entry"] += "x"
    (out / export.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(sl["file"]) + ".*" + re.escape(sl["entry"])):
        flamingo_jax.load_exported(str(out))

    out, index = broken_copy(full, tmp_path / "gap")  # a slice left out: the parameter is not covered
    dropped = index["parameters"][name]["slices"].pop()
    (out / export.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(name) + ".*do not cover"):
        flamingo_jax.load_exported(str(out))
    assert dropped["file"]

    out, index = broken_copy(full, tmp_path / "unknown")
    index["parameters"]["lm/bogus/kernel"] = dict(index["parameters"][name])
    (out / export.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lm/bogus/kernel"):
        flamingo_jax.load_exported(str(out))

    out, index = broken_copy(full, tmp_path / "shape")
    index["parameters"][name]["shape"][0] += 1
    (out / export.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(name) + ".*stored float32"):
        flamingo_jax.load_exported(str(out))


@pytest.mark.slow
def test_single_file_exports_of_earlier_versions_still_load(exported, reference, tmp_path):
    """The format before sharding: one model.safetensors holding every parameter whole, no index."""
    _, _, full = exported
    _, forward, media, ids, want = reference
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(os.path.join(full, name), old / name)
    tensors = checkpoint.flatten(nnx.to_pure_dict(nnx.state(flamingo_jax.load_exported(full).model)))
    export.write_safetensors(str(old / export.MODEL_FILE), tensors, {"format": export.FORMAT, "contents": "full"})
    ex = flamingo_jax.load_exported(str(old))
    np.testing.assert_array_equal(np.asarray(forward(nnx.state(ex.model), media, ids)), want)


@pytest.mark.slow
def test_exported_files_are_safetensors_json_and_tokenizer_only_no_pickle(exported):
    from safetensors.numpy import load_file

    _, trained, full = exported
    sizes = {}
    for out in (trained, full):
        files = sorted(os.listdir(out))
        shards = [f for f in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
        assert files == sorted(["config.json", export.INDEX_FILE, "tokenizer.model", *shards]) and shards
        for name in files:
            head = pathlib.Path(out, name).read_bytes()[:16]
            assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), name  # pickle
            assert not head.startswith((b"PK\x03\x04", b"\x93NUMPY")), name  # torch zip / numpy .npy
        for shard in shards:
            raw = pathlib.Path(out, shard).read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8 : 8 + n])
            assert header.pop("__metadata__")["format"] == export.FORMAT
            assert max(t["data_offsets"][1] for t in header.values()) == len(raw) - 8 - n  # nothing else in it
            assert set(load_file(os.path.join(out, shard))) == set(header)  # the reference reader agrees
        sizes[out] = set(json.loads(pathlib.Path(out, export.INDEX_FILE).read_text())["parameters"])
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
def test_generation_on_a_mesh_matches_one_device(exported):
    """The model on (2, 2, 2): the cache's batch over `data`, its kv heads over `tensor`; the prompt's
    log-probabilities agree with one device's, and beam search picks the same tokens."""
    _, _, full = exported
    one, sharded = flamingo_jax.load_exported(full), flamingo_jax.load_exported(full, mesh=export._mesh((2, 2, 2)))
    tok, size = one.tokenizer, one.model.cfg.vision.image_size
    dec = generate.Decoder(sharded.model, rules=sharded.config["sharding_rules"])
    ref = generate.Decoder(one.model)
    assert ref.mesh is None and dict(dec.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    media = generate.prepare_image(np.full((40, 30, 3), 200, np.uint8), size)
    prompt, beam, new = tok.encode("<image>"), 2, 6
    cache = dec.init_cache(beam, len(prompt) + new)  # the shapes generate() uses: compiled once
    k = cache["k"].sharding  # [layers, batch, length, kv_heads, head_dim]
    assert k.mesh.shape == dec.mesh.shape and k.spec[1] in ("data", ("data",)) and k.spec[3] in ("tensor", ("tensor",))
    ids = np.tile(np.array([prompt]), (beam, 1))
    logp, cache = dec.decode(jax.numpy.repeat(dec.encode(media), beam, 0), ids, cache)
    want, _ = ref.decode(jax.numpy.repeat(ref.encode(media), beam, 0), ids, ref.init_cache(beam, len(prompt) + new))
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)
    assert cache["k"].sharding.spec == k.spec  # the updated cache keeps its layout
    want = generate.generate(ref, tok, media, prompt, beam=beam, max_new_tokens=new)
    assert want and generate.generate(dec, tok, media, prompt, beam=beam, max_new_tokens=new) == want


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
        "--mesh=2,1,2",  # loaded from the (2, 2, 2) export onto 4 devices
    ]
    p = subprocess.run(cmd, env=h.env(devices=4), capture_output=True, text=True, timeout=300)
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


class FakeDevice(NamedTuple):
    id: int
    process_index: int


class FakeSharding:
    """What plan_files reads of a sharding: the block of each device."""

    def __init__(self, blocks: dict):
        self.blocks = blocks

    def devices_indices_map(self, shape):
        return self.blocks


def test_plan_writes_each_block_once_spreading_replicated_ones_over_processes():
    """2 processes x 2 devices: a sharded array's blocks go to the processes that hold them; whole arrays held by
    every device go to the process with fewer bytes so far, each once; files obey the size cap."""
    d = [FakeDevice(i, i // 2) for i in range(4)]
    rows = lambda a, b: (slice(a, b), slice(None))
    arrays = {
        "a/sharded": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=None),
        "b/whole": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=None),
        "c/whole": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=None),
        "d/scalar": jax.ShapeDtypeStruct((), np.float32, sharding=None),
    }
    shardings = {
        "a/sharded": FakeSharding({d[0]: rows(0, 4), d[1]: rows(0, 4), d[2]: rows(4, 8), d[3]: rows(4, 8)}),
        "b/whole": FakeSharding({x: rows(None, None) for x in d}),
        "c/whole": FakeSharding({x: rows(None, None) for x in d}),
        "d/scalar": FakeSharding({x: () for x in d}),
    }
    arrays = {k: type("A", (), dict(shape=v.shape, dtype=v.dtype, sharding=shardings[k])) for k, v in arrays.items()}
    files = export.plan_files(arrays, max_file_bytes=200)
    pieces = [p for f in files for p in f.pieces]
    assert sorted(p.entry for p in pieces) == [
        "a/sharded[0:4,0:4]",
        "a/sharded[4:8,0:4]",
        "b/whole",
        "c/whole",
        "d/scalar",
    ]
    owner = {p.entry: p.device for p in pieces}
    assert owner["a/sharded[0:4,0:4]"] == d[0] and owner["a/sharded[4:8,0:4]"] == d[2]  # lowest id of the holders
    assert {owner["b/whole"].process_index, owner["c/whole"].process_index} == {0, 1}  # balanced
    assert all(f.process == p.device.process_index for f in files for p in f.pieces)
    assert all(sum(p.nbytes for p in f.pieces) <= 200 for f in files)
    assert [f.name for f in files] == [export.shard_name(i, len(files)) for i in range(len(files))]
    assert [f.process for f in files] == sorted(f.process for f in files)
    index = export.index_doc(files, arrays, {"format": export.FORMAT})
    assert index["parameters"]["a/sharded"]["slices"][1] == {
        "entry": "a/sharded[4:8,0:4]",
        "file": index["weight_map"]["a/sharded[4:8,0:4]"],
        "start": [4, 0],
        "stop": [8, 4],
    }
    assert index["metadata"]["total_size"] == 3 * 8 * 4 * 4 + 4


def test_slices_must_tile_their_parameter():
    st = lambda *slices: export.Stored((4, 4), "float32", tuple(("f", f"e{i}", *s) for i, s in enumerate(slices)))
    export._check_tiling("p", st(((0, 0), (2, 4)), ((2, 0), (4, 4))), "idx")
    with pytest.raises(ValueError, match="do not cover"):
        export._check_tiling("p", st(((0, 0), (2, 4))), "idx")
    with pytest.raises(ValueError, match="overlap"):
        export._check_tiling("p", st(((0, 0), (3, 4)), ((2, 0), (4, 4))), "idx")
    with pytest.raises(ValueError, match="outside"):
        export._check_tiling("p", st(((0, 0), (2, 4)), ((2, 0), (5, 4))), "idx")
