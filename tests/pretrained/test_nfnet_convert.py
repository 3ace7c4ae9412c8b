"""DeepMind-layout NFNet weights (a tiny pickle written here) convert to safetensors and match the source."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import layers
from flamingo_jax.pretrained import load, nfnet_convert

WIDTHS, DEPTHS, GROUP, STEM = (16, 32, 48, 64), (1, 2, 1, 2), 8, (16, 32, 64, 8)
NUM_CLASSES = 5
ROOT = "NFNet/~/"
REPO = Path(__file__).resolve().parents[2]


def _block_name(k: int) -> str:
    return ROOT + ("nf_block" if k == 0 else f"nf_block_{k}")


def deepmind_params(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Random weights with the module/param names and shapes of DeepMind's haiku NFNet."""
    rng = np.random.default_rng(seed)
    p: dict[str, dict[str, np.ndarray]] = {}

    def conv(name: str, k: int, cin: int, cout: int) -> None:
        p[name] = dict(
            w=rng.normal(size=(k, k, cin, cout)).astype(np.float32),
            gain=(1 + 0.2 * rng.normal(size=cout)).astype(np.float32),
            bias=(0.1 * rng.normal(size=cout)).astype(np.float32),
        )

    def linear(name: str, cin: int, cout: int) -> None:
        p[name] = dict(
            w=(rng.normal(size=(cin, cout)) / np.sqrt(cin)).astype(np.float32),
            b=(0.1 * rng.normal(size=cout)).astype(np.float32),
        )

    chans = (3, *STEM)
    for i in range(4):
        conv(f"{ROOT}stem_conv{i}", 3, chans[i], chans[i + 1])
    ch, k = STEM[-1], 0
    for s, (w, d) in enumerate(zip(WIDTHS, DEPTHS)):
        for j in range(d):
            name, width = _block_name(k), w // 2
            conv(f"{name}/~/conv0", 1, ch, width)
            conv(f"{name}/~/conv1", 3, GROUP, width)
            conv(f"{name}/~/conv1b", 3, GROUP, width)
            conv(f"{name}/~/conv2", 1, width, w)
            if j == 0 and (s > 0 or ch != w):
                conv(f"{name}/~/conv_shortcut", 1, ch, w)
            linear(f"{name}/~/squeeze_excite/~/linear", w, w // 2)
            linear(f"{name}/~/squeeze_excite/~/linear_1", w // 2, w)
            p[name] = dict(skip_gain=np.asarray(0.5 + 0.2 * rng.normal(), np.float32))
            ch, k = w, k + 1
    conv(f"{ROOT}final_conv", 1, ch, 2 * ch)
    linear(f"{ROOT}linear", 2 * ch, NUM_CLASSES)
    return p


def reference(p: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """DeepMind's forward pass (nfnets/nfnet.py, base.py) written directly on their parameter dict."""
    act = lambda v: jax.nn.gelu(v, approximate=True) * 1.7015043497085571  # haiku's jax.nn.gelu default

    def conv(name: str, v: jax.Array, stride: int = 1) -> jax.Array:
        w, gain, bias = p[name]["w"], p[name]["gain"], p[name]["bias"]
        mean, var = w.mean((0, 1, 2), keepdims=True), w.var((0, 1, 2), keepdims=True)
        scale = jax.lax.rsqrt(jnp.maximum(var * np.prod(w.shape[:-1]), 1e-4)) * gain
        groups = v.shape[-1] // w.shape[2]
        y = jax.lax.conv_general_dilated(
            v,
            w * scale - mean * scale,
            (stride, stride),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
        return y + bias

    def pool(v: jax.Array) -> jax.Array:  # 2x2 average; every grid here is even
        b, h, w, c = v.shape
        return v.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))

    out = x
    for i in range(4):
        out = conv(f"{ROOT}stem_conv{i}", out, 2 if i in (0, 3) else 1)
        out = act(out) if i < 3 else out
    expected_std, k = 1.0, 0
    for s, d in enumerate(DEPTHS):
        for j in range(d):
            name, stride = _block_name(k), (2 if s > 0 else 1) if j == 0 else 1
            o = act(out) / expected_std
            has_sc = f"{name}/~/conv_shortcut" in p
            if stride > 1:
                sc = conv(f"{name}/~/conv_shortcut", pool(o)) if has_sc else pool(o)
            else:
                sc = conv(f"{name}/~/conv_shortcut", o) if has_sc else out
            h = conv(f"{name}/~/conv0", o)
            h = conv(f"{name}/~/conv1", act(h), stride)
            h = conv(f"{name}/~/conv1b", act(h))
            h = conv(f"{name}/~/conv2", act(h))
            se0, se1 = p[f"{name}/~/squeeze_excite/~/linear"], p[f"{name}/~/squeeze_excite/~/linear_1"]
            g = jax.nn.relu(h.mean((1, 2)) @ se0["w"] + se0["b"]) @ se1["w"] + se1["b"]
            h = h * (2 * jax.nn.sigmoid(g))[:, None, None]
            out = h * p[name]["skip_gain"] * 0.2 + sc
            expected_std = 1.0 if j == 0 else expected_std
            expected_std, k = (expected_std**2 + 0.2**2) ** 0.5, k + 1
    pooled = act(conv(f"{ROOT}final_conv", out)).mean((1, 2))
    return out, pooled @ p[f"{ROOT}linear"]["w"] + p[f"{ROOT}linear"]["b"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[dict, Path, Path]:
    d = tmp_path_factory.mktemp("nfnet")
    params = deepmind_params()
    src = d / "F0_haiku.npz"  # DeepMind's names: a pickle despite the suffix
    with open(src, "wb") as f:
        pickle.dump(params, f)
    out = d / "nfnet.safetensors"
    assert nfnet_convert.main([f"--src={src}", f"--out={out}", "--allow_pickle"]) == 0
    return params, src, out


def test_cli_refuses_to_unpickle_without_opt_in(converted, tmp_path):
    _, src, _ = converted
    out = tmp_path / "x.safetensors"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "flamingo_jax.pretrained.nfnet_convert", f"--src={src}", f"--out={out}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and "--allow_pickle" in proc.stderr, proc.stderr
    assert not out.exists()


def test_converted_weights_reproduce_deepmind_forward(converted):
    params, _, out = converted
    arch, activation = nfnet_convert.read_metadata(out)
    assert (arch["widths"], arch["depths"], arch["stem_widths"]) == (list(WIDTHS), list(DEPTHS), list(STEM))
    assert (arch["group_size"], arch["se_ratio"], arch["num_classes"]) == (GROUP, 0.5, NUM_CLASSES)
    assert activation == "scaled_gelu_tanh" and activation in layers.ACTIVATIONS

    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)), jnp.float32)
    want_feats, want_logits = jax.jit(reference)(jax.tree.map(jnp.asarray, params), x)
    model = nfnet_convert.load_nfnet(out, features_only=False)
    graphdef, state = nnx.split(model)

    @jax.jit  # one compile for both outputs: eager NFNet dispatch is slow on CPU
    def forward(state: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        m = nnx.merge(graphdef, state)
        return m.features(x), m(x)["logits"]

    feats, logits = forward(state, x)
    assert feats.shape == (2, 2, 2, WIDTHS[-1])
    np.testing.assert_allclose(np.asarray(feats), np.asarray(want_feats), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-4, rtol=1e-4)

    # The features-only tower (what Flamingo uses) has the same weights, ignoring the file's classifier head.
    tower = nfnet_convert.load_nfnet(out)
    assert tower.fc is None and tower.final_conv is None
    full = dict(nnx.to_flat_state(state))
    for p, var in nnx.to_flat_state(nnx.state(tower)):
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(full[p][...]))


def test_sharded_load_and_npz_source(converted, tmp_path):
    params, _, out = converted
    mesh = sharding.make_mesh((1, 2, 4))
    single = dict(nnx.to_flat_state(nnx.state(nfnet_convert.load_nfnet(out))))
    sharded = nfnet_convert.load_nfnet(out, mesh=mesh, param_dtype=jnp.bfloat16)
    for p, var in nnx.to_flat_state(nnx.state(sharded)):
        assert var[...].dtype == jnp.bfloat16 and var[...].sharding.mesh.shape == mesh.shape
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(single[p][...].astype(jnp.bfloat16)))

    # A real .npz ('module/param' keys, no object arrays) converts without unpickling.
    npz = tmp_path / "flat.npz"
    np.savez(npz, **{f"{m}/{k}": v for m, ps in params.items() for k, v in ps.items()})
    nfnet_convert.convert(npz, tmp_path / "flat.safetensors")
    with load.TensorReader(out) as a, load.TensorReader(tmp_path / "flat.safetensors") as b:
        assert a.names == b.names
        for n in a.names:
            np.testing.assert_array_equal(a.read(n, ()), b.read(n, ()))


def test_missing_tensors_fail_by_name(converted, tmp_path):
    params, _, out = converted
    broken = {m: dict(ps) for m, ps in params.items()}
    del broken[f"{ROOT}nf_block_2/~/conv1b"]["gain"]
    with pytest.raises(load.CheckpointError, match=r"NFNet/~/nf_block_2/~/conv1b/gain.*expected shape \(16,\)"):
        nfnet_convert.convert_params(broken)

    from safetensors.numpy import load_file, save_file

    tensors = load_file(out)
    del tensors["stages/1/rest/conv0/kernel"]
    with load.TensorReader(out) as r:
        meta = r.metadata
    save_file(tensors, tmp_path / "missing.safetensors", metadata=meta)
    with pytest.raises(load.CheckpointError, match=r"stages/1/rest/conv0/kernel.*expected shape \(1, 1, 1, 32, 16\)"):
        nfnet_convert.load_nfnet(tmp_path / "missing.safetensors")
