"""NFNet against float64 NumPy references of its conv and block, plus size, shape and scan checks.

Models are built abstractly (`nnx.eval_shape`) and filled with NumPy random values where a test does not need
the real initialisers: compiling the random-init graph of even a tiny NFNet takes ~10 s on CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from flamingo_jax import sharding
from flamingo_jax.models import layers
from flamingo_jax.models.nfnet import NFBlock, NFNet, WSConv2D

TINY = dict(widths=(16, 32, 48, 64), depths=(1, 2, 3, 1), stem_widths=(8, 8, 8), group_size=8)


# ------------------------------------------------------------------------------------------------- references
def np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))) * layers.GELU_GAMMA


def np_standardize(w: np.ndarray, gain: np.ndarray) -> np.ndarray:
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = w.var(axis=(0, 1, 2), keepdims=True)
    fan_in = np.prod(w.shape[:-1])
    return (w - mean) / np.sqrt(np.maximum(var * fan_in, 1e-4)) * gain


def np_same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def np_conv(x: np.ndarray, w: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """Direct grouped conv, SAME padding: a sum over kernel taps of per-group channel contractions."""
    b, h, wd, _ = x.shape
    kh, kw, cin_g, cout = w.shape
    ph, pw = np_same_pads(h, kh, stride), np_same_pads(wd, kw, stride)
    xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    ho, wo = -(-h // stride), -(-wd // stride)
    out = np.zeros((b, ho, wo, groups, cout // groups))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            patch = patch.reshape(b, ho, wo, groups, cin_g)
            out += np.einsum("bhwgc,cgo->bhwgo", patch, w[i, j].reshape(cin_g, groups, cout // groups))
    return out.reshape(b, ho, wo, cout)


def np_wsconv(x: np.ndarray, p: dict, stride: int, groups: int) -> np.ndarray:
    return np_conv(x, np_standardize(p["kernel"], p["gain"]), stride, groups) + p["bias"]


def np_avg_pool_same(x: np.ndarray) -> np.ndarray:
    b, h, w, c = x.shape
    ho, wo = -(-h // 2), -(-w // 2)
    out = np.zeros((b, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            out[:, i, j] = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(1, 2))  # edges: real pixels only
    return out


def np_block(x: np.ndarray, p: dict, *, beta: float, stride: int, groups: int, alpha: float) -> np.ndarray:
    out = np_gelu(x) * beta
    if stride > 1:
        shortcut = np_avg_pool_same(out)
        if "conv_shortcut" in p:
            shortcut = np_wsconv(shortcut, p["conv_shortcut"], 1, 1)
    elif "conv_shortcut" in p:
        shortcut = np_wsconv(out, p["conv_shortcut"], 1, 1)
    else:
        shortcut = x
    out = np_wsconv(out, p["conv0"], 1, 1)
    out = np_wsconv(np_gelu(out), p["conv1"], stride, groups)
    out = np_wsconv(np_gelu(out), p["conv1b"], 1, groups)
    out = np_wsconv(np_gelu(out), p["conv2"], 1, 1)
    se = p["se"]
    h = out.mean(axis=(1, 2))
    h = np.maximum(h @ se["fc0"]["kernel"] + se["fc0"]["bias"], 0.0)
    h = 1.0 / (1.0 + np.exp(-(h @ se["fc1"]["kernel"] + se["fc1"]["bias"])))
    out = h[:, None, None, :] * 2 * out
    return out * p["skip_gain"] * alpha + shortcut


# ---------------------------------------------------------------------------------------------------- helpers
def randomize(model: nnx.Module, seed: int) -> nnx.Module:
    """Fill every parameter with non-trivial values (gains near 1, non-zero biases and skip gains)."""
    rs = np.random.RandomState(seed)
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Param):
            continue
        shape, name = node.shape, path[-1]
        if name == "gain":
            v = 1.0 + 0.3 * rs.standard_normal(shape)
        elif name == "skip_gain":
            v = rs.uniform(0.3, 1.0, shape)
        elif name == "bias":
            v = 0.2 * rs.standard_normal(shape)
        elif name == "kernel" and len(path) >= 2 and path[-2] in ("fc0", "fc1", "fc"):
            v = rs.standard_normal(shape) / math.sqrt(shape[-2])
        else:
            v = rs.standard_normal(shape)
        node.set_value(jnp.asarray(v, jnp.float32))
    return model


def np_params(module: nnx.Module) -> dict:
    """The module's parameters as a nested dict of float64 arrays."""
    out: dict = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param):
            d = out
            for k in path[:-1]:
                d = d.setdefault(k, {})
            d[path[-1]] = np.asarray(node[...], np.float64)
    return out


def rel_err(got: jax.Array, want: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def abstract_nfnet(**kw) -> NFNet:
    return nnx.eval_shape(lambda: NFNet(rngs=nnx.Rngs(0), **kw))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(
    "cin,cout,k,stride,groups,hw",
    [
        (5, 7, 3, 1, 1, (8, 8)),
        (8, 12, 3, 2, 4, (9, 11)),
        (6, 10, 1, 2, 1, (7, 6)),
    ],
)
def test_wsconv_matches_numpy(cin, cout, k, stride, groups, hw):
    conv = randomize(
        nnx.eval_shape(lambda: WSConv2D(cin, cout, k, stride=stride, groups=groups, rngs=nnx.Rngs(0))),
        seed=cin + k,
    )
    x = np.random.RandomState(1).standard_normal((2, *hw, cin))
    got = conv(jnp.asarray(x, jnp.float32))
    want = np_wsconv(x, np_params(conv), stride, groups)
    assert got.shape == want.shape == (2, -(-hw[0] // stride), -(-hw[1] // stride), cout)
    assert rel_err(got, want) < 1e-5


def test_wsconv_init_is_standardized():
    conv = WSConv2D(6, 8, 3, groups=2, rngs=nnx.Rngs(3))
    assert conv.kernel.shape == (3, 3, 3, 8) and conv.kernel.get_metadata()["axes"] == (
        "conv_h",
        "conv_w",
        "conv_in",
        "conv_out",
    )
    np.testing.assert_array_equal(conv.gain[...], 1.0)
    np.testing.assert_array_equal(conv.bias[...], 0.0)
    w = np.asarray(conv.standardized_kernel(), np.float64)
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(w.var(axis=(0, 1, 2)) * 27, 1.0, rtol=1e-4)  # variance 1/fan_in


@pytest.mark.parametrize("cin,cout,stride,hw", [(16, 24, 2, (7, 9)), (16, 16, 1, (6, 5))])
def test_block_matches_numpy(cin, cout, stride, hw):
    make = lambda: NFBlock(cin, cout, stride=stride, group_size=4, rngs=nnx.Rngs(0))
    block = randomize(nnx.eval_shape(make), seed=cout)
    assert (block.conv_shortcut is None) == (stride == 1 and cin == cout)
    x = np.random.RandomState(2).standard_normal((3, *hw, cin))
    got = nnx.jit(lambda b, x: b(x, beta=0.9))(block, jnp.asarray(x, jnp.float32))
    want = np_block(x, np_params(block), beta=0.9, stride=stride, groups=int(cout * 0.5) // 4, alpha=0.2)
    assert got.shape == want.shape == (3, -(-hw[0] // stride), -(-hw[1] // stride), cout)
    assert rel_err(got, want) < 1e-5


def test_block_at_init_is_shortcut_only():
    block = NFBlock(16, 16, group_size=8, rngs=nnx.Rngs(0))
    assert block.skip_gain[...] == 0.0 and block.skip_gain.get_metadata()["axes"] == ()
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
    np.testing.assert_array_equal(block(x, beta=0.5), x)  # SkipInit: the identity block is exactly identity


def test_stochastic_depth_eval_identity_train_drops_examples():
    block = randomize(nnx.eval_shape(lambda: NFBlock(8, 8, group_size=4, rngs=nnx.Rngs(0))), seed=5)
    x = jax.random.normal(jax.random.key(1), (32, 3, 3, 8))
    run = nnx.jit(lambda b, x, rate, key: b(x, stochdepth_rate=rate, train=True, rng=key))
    plain = block(x)
    np.testing.assert_array_equal(block(x, stochdepth_rate=0.5, train=False), plain)
    np.testing.assert_allclose(run(block, x, 0.0, jax.random.key(0)), plain, rtol=1e-6, atol=1e-6)
    got = run(block, x, 0.5, jax.random.key(7))
    residual = np.asarray(plain - x)  # the block's alpha * skip_gain * f(x) term
    dropped = np.all(np.isclose(np.asarray(got), np.asarray(x), atol=1e-6), axis=(1, 2, 3))
    kept = np.all(np.isclose(np.asarray(got), np.asarray(x) + residual / 0.5, atol=1e-5), axis=(1, 2, 3))
    assert np.all(dropped ^ kept), "every example is either wholly dropped or wholly kept (scaled by 1/keep)"
    assert 4 <= dropped.sum() <= 28
    with pytest.raises(ValueError, match="rng"):
        block(x, stochdepth_rate=0.5, train=True)


def test_f0_parameter_count():
    n = count_params(abstract_nfnet(variant="F0", num_classes=1000))
    assert abs(n - 71.5e6) / 71.5e6 < 0.005, n
    head = (1536 * 3072 + 2 * 3072) + (3072 * 1000 + 1000)
    assert count_params(abstract_nfnet(variant="F0")) == n - head  # num_classes=None: no final_conv, no fc


@pytest.mark.parametrize("variant,size,grid", [("F0", 320, 10), ("F6", 320, 10), ("F0", 224, 7), ("F0", 225, 8)])
def test_feature_grid(variant, size, grid):
    graphdef, state = nnx.split(abstract_nfnet(variant=variant))
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x), state, images)
    assert out.shape == (2, grid, grid, 1536)


def test_depths_and_betas_follow_reference():
    m = abstract_nfnet(variant="F6")
    assert m.depths == (7, 14, 42, 21) and m.drop_rate == 0.5 and m.num_blocks == 84
    assert m.stages[2].rest.conv1.kernel.shape == (41, 3, 3, 128, 768)
    betas = abstract_nfnet(variant="F0").betas  # depths (1, 2, 6, 3)
    g = lambda n: math.sqrt(1 + n * 0.2**2)  # expected std after n residual additions since a reset
    # A transition block sees the previous stage's accumulated std; the std resets after every transition.
    want = [
        1.0,
        1 / g(1),
        1 / g(1),
        1 / g(2),
        1 / g(1),
        1 / g(2),
        1 / g(3),
        1 / g(4),
        1 / g(5),
        1 / g(6),
        1 / g(1),
        1 / g(2),
    ]
    np.testing.assert_allclose(betas, want, rtol=1e-12)


def test_scan_and_loop_agree_in_eval_and_train():
    scanned = randomize(abstract_nfnet(variant=None, num_classes=10, **TINY), seed=11)
    state = nnx.state(scanned)
    looped = abstract_nfnet(variant=None, num_classes=10, scan_blocks=False, **TINY)
    nnx.update(looped, state)
    x = jax.random.normal(jax.random.key(2), (3, 37, 41, 3))  # odd sizes: SAME pools with partial windows
    key = jax.random.key(4)
    fwd = nnx.jit(lambda m, x, k: (m(x)["logits"], m(x, train=True, rng=k)["logits"], m.features(x)))
    e1, t1, f1 = fwd(scanned, x, key)
    e2, t2, f2 = fwd(looped, x, key)
    assert f1.shape == (3, 2, 2, 64) and e1.shape == (3, 10)
    np.testing.assert_allclose(e1, e2, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(t1, t2, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(f1, f2, rtol=2e-5, atol=1e-5)
    assert not np.allclose(e1, t1)  # training-mode randomness is active
    with pytest.raises(ValueError, match="rng"):
        scanned(x, train=True)


def test_param_axes_and_validation():
    model = abstract_nfnet(variant="F1", num_classes=1000)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            axes = node.get_metadata().get("axes")
            assert axes is not None and len(axes) == len(node.shape), (path, axes, node.shape)
            stacked = "rest" in path
            assert (axes[:1] == ("layers",)) == stacked, path
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    # Raises if any logical axis has no rule in DEFAULT_RULES.
    sharding.state_shardings(nnx.state(model, nnx.Param), mesh, sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match="group_size"):
        abstract_nfnet(variant=None, widths=(16, 32, 48, 64), depths=(1, 1, 1, 1), group_size=128)
    with pytest.raises(ValueError, match="num_classes=None"):
        abstract_nfnet(variant=None, **TINY)(jnp.zeros((1, 32, 32, 3)))


def test_gradients_with_remat_match_plain_loop():
    kw = dict(
        variant=None,
        num_classes=10,
        widths=(16, 32, 48, 64),
        depths=(1, 2, 2, 1),
        stem_widths=(8, 8, 8),
        group_size=8,
    )
    x = jax.random.normal(jax.random.key(3), (2, 19, 17, 3))
    grads = []
    for remat, scan in (("full", True), ("none", False)):
        graphdef, state = nnx.split(randomize(abstract_nfnet(remat=remat, scan_blocks=scan, **kw), seed=13))
        loss = lambda s, g=graphdef: jnp.sum(nnx.merge(g, s)(x, train=True, rng=jax.random.key(0))["logits"] ** 2)
        grads.append(jax.jit(jax.grad(loss))(state))
    flat = jax.tree.leaves(grads[0])
    assert all(np.all(np.isfinite(g)) for g in flat) and any(np.any(g != 0) for g in flat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *grads)
