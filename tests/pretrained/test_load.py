"""The safetensors reader: any block of any tensor, in bounded positional reads, equals NumPy's slice."""

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from flamingo_jax.pretrained import load


@pytest.fixture
def tensors(tmp_path):
    rng = np.random.default_rng(0)
    t = {
        "w": rng.normal(size=(7, 5, 6)).astype(np.float32),
        "b": rng.normal(size=(9,)).astype(ml_dtypes.bfloat16),
        "scalar": np.asarray(rng.normal(), np.float16),
        "ids": rng.integers(-9, 9, (4, 11)).astype(np.int8),
    }
    save_file(t, str(tmp_path / "m.safetensors"), metadata={"format": "test"})
    return tmp_path / "m.safetensors", t


@pytest.mark.parametrize("chunk", [8, 64, 1 << 20])  # bytes: rows larger than a chunk, several rows, everything
def test_random_blocks_equal_numpy(tensors, chunk, monkeypatch):
    monkeypatch.setattr(load, "_CHUNK_BYTES", chunk)
    path, t = tensors
    rng = np.random.default_rng(chunk)
    with load.TensorReader(path) as r:
        assert r.metadata == {"format": "test"} and r.names == set(t)
        for name, want in t.items():
            assert (r.shape(name), r.dtype(name)) == (want.shape, want.dtype)
            np.testing.assert_array_equal(r.read(name, ()), want)
            for _ in range(10):
                idx = []
                for n in want.shape:
                    a = int(rng.integers(0, n))
                    idx.append(slice(a, int(rng.integers(a + 1, n + 1))))
                np.testing.assert_array_equal(r.read(name, tuple(idx)), want[tuple(idx)])


def test_truncated_and_garbage_files_fail_naming_them(tensors, tmp_path):
    path, _ = tensors
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    with pytest.raises(load.CheckpointError, match=r"cut\.safetensors.*tensor .* do not fit"):
        load.TensorReader(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(load.CheckpointError, match=r"junk\.safetensors is not a safetensors file"):
        load.TensorReader(tmp_path / "junk.safetensors")
