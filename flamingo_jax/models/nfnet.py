"""Normalizer-Free ResNets (NFNet-F0..F7; Brock et al. 2021), Flamingo's vision encoder.

Follows DeepMind's haiku reference (`nfnets/nfnet.py`, `nfnets/base.py`): weight-standardised convolutions
with a learnable gain, scaled activations, residual blocks `x + alpha * skip_gain * f(act(x) * beta)` whose
`beta` tracks the analytically expected signal std so that no normalisation layer is needed, squeeze-excite,
an average-pool shortcut and stochastic depth.

Every stage after its first (transition) block repeats one block shape; those blocks are stored stacked
(leading `layers` dim) and applied with `lax.scan`, so NFNet-F6 (84 blocks) compiles in about the time of
eight blocks. The parameter tree is the same whether or not `scan_blocks` is set, so checkpoints work with
either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import layers, stacking

Array = jax.Array

# Reference widths/depths/dropout per variant: F-variants share widths and differ only in depth and dropout.
NFNET_VARIANTS: dict[str, dict[str, Any]] = {
    f"F{i}": dict(widths=(256, 512, 1536, 1536), depths=tuple(d * (i + 1) for d in (1, 2, 6, 3)), drop_rate=r)
    for i, r in enumerate((0.2, 0.3, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5))
}
DEFAULT_STRIDES = (1, 2, 2, 2)
BOTTLENECK_RATIO = 0.5  # of the block's output width ("big_width" in the reference)
WS_EPS = 1e-4
_FEATURE_AXES = ("vision_batch", "height", "width", "channels")


def _variance_scaling_normal() -> layers.Initializer:
    # The reference initialises conv weights from an untruncated normal; standardisation makes the scale moot,
    # but the distribution shape still matters for exact reproduction of init statistics.
    return nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


def _haiku_linear_init(fan_in: int) -> layers.Initializer:
    # hk.Linear's default: normal truncated at 2 std, with std 1/sqrt(fan_in) before truncation.
    return nnx.initializers.truncated_normal(stddev=1.0 / math.sqrt(fan_in))


class WSConv2D(nnx.Module):
    """Scaled weight-standardised 2-D conv (NHWC input, HWIO kernel, 'SAME' padding), always with bias."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"WSConv2D: groups={groups} must divide in_ch={in_ch} and out_ch={out_ch}")
        self.stride = stride
        self.groups = groups
        self.dtype = dtype
        shape = (kernel_size, kernel_size, in_ch // groups, out_ch)
        self.kernel = layers.param(
            rngs, _variance_scaling_normal(), shape, ("conv_h", "conv_w", "conv_in", "conv_out"), param_dtype
        )
        self.gain = layers.param(rngs, nnx.initializers.ones, (out_ch,), ("conv_out",), param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros, (out_ch,), ("conv_out",), param_dtype)

    def standardized_kernel(self) -> Array:
        """`gain * (w - mean) / sqrt(fan_in * var)`, per output channel, computed in float32."""
        w = self.kernel[...].astype(jnp.float32)
        mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
        var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
        fan_in = math.prod(w.shape[:-1])
        scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, WS_EPS)) * self.gain[...].astype(jnp.float32)
        return w * scale - mean * scale

    def __call__(self, x: Array) -> Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.standardized_kernel().astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        return y + self.bias[...].astype(self.dtype)


class SqueezeExcite(nnx.Module):
    """Channel gates `sigmoid(fc1(relu(fc0(mean_hw(x)))))`, shaped [B, 1, 1, C]."""

    def __init__(
        self,
        ch: int,
        hidden: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.fc0 = layers.DenseGeneral(ch, hidden, ("channels", "channels"), kernel_init=_haiku_linear_init(ch), **kw)
        self.fc1 = layers.DenseGeneral(
            hidden, ch, ("channels", "channels"), kernel_init=_haiku_linear_init(hidden), **kw
        )

    def __call__(self, x: Array) -> Array:
        # Pool in float32: a bf16 sum over a 40x40 grid loses most of its mantissa.
        h = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        h = self.fc1(jax.nn.relu(self.fc0(h)))
        return jax.nn.sigmoid(h)[:, None, None, :]


def _avg_pool_2x2_same(x: Array) -> Array:
    """2x2/2 average pool with 'SAME' padding that, like hk.avg_pool, divides by the count of real pixels."""
    window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
    # A Python 0.0 init lets JAX recognise the sum monoid (reduce_window_sum, differentiable); an array init
    # traced under jit makes a generic reduce_window, which has no VJP.
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, "SAME")
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, "SAME")
    return summed / counts


class NFBlock(nnx.Module):
    """The NFNet bottleneck block with two grouped 3x3 convs, squeeze-excite and SkipInit.

    `beta` and the stochastic-depth rate are call arguments rather than attributes because they differ between
    the blocks of one stacked (scanned) group, which share a single graph definition.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int = 1,
        group_size: int = 128,
        se_ratio: float = 0.5,
        alpha: float = 0.2,
        activation: str = "scaled_gelu",
        stochdepth_scale_by_keep: bool = True,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        width = int(out_ch * BOTTLENECK_RATIO)
        if width < group_size or width % group_size:
            raise ValueError(
                f"group_size={group_size} must divide the bottleneck width {width} "
                f"(= {BOTTLENECK_RATIO} * {out_ch} from widths)"
            )
        self.stride = stride
        self.alpha = alpha
        self.act = layers.activation(activation)
        self.scale_by_keep = stochdepth_scale_by_keep
        self.dtype = dtype
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        groups = width // group_size
        self.conv0 = WSConv2D(in_ch, width, 1, **conv)
        self.conv1 = WSConv2D(width, width, 3, stride=stride, groups=groups, **conv)
        self.conv1b = WSConv2D(width, width, 3, groups=groups, **conv)
        self.conv2 = WSConv2D(width, out_ch, 1, **conv)
        self.conv_shortcut = WSConv2D(in_ch, out_ch, 1, **conv) if stride > 1 or in_ch != out_ch else None
        self.se = SqueezeExcite(out_ch, max(1, int(out_ch * se_ratio)), **conv)
        # SkipInit: every residual branch starts switched off, so the network is shallow at initialisation.
        self.skip_gain = layers.param(rngs, nnx.initializers.zeros, (), (), param_dtype)

    def __call__(
        self,
        x: Array,
        *,
        beta: float | Array = 1.0,
        stochdepth_rate: float | Array = 0.0,
        train: bool = False,
        rng: Array | None = None,
    ) -> Array:
        x = x.astype(self.dtype)
        out = self.act(x) * jnp.asarray(beta, self.dtype)
        if self.stride > 1:
            shortcut = _avg_pool_2x2_same(out)
            if self.conv_shortcut is not None:
                shortcut = self.conv_shortcut(shortcut)
        elif self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(out)
        else:
            shortcut = x
        out = self.conv0(out)
        out = self.conv1(self.act(out))
        out = self.conv1b(self.act(out))
        out = self.conv2(self.act(out))
        out = (self.se(out) * 2) * out  # x2 undoes the sigmoid's mean of 0.5 at init
        if train:
            out = self._stochastic_depth(out, stochdepth_rate, rng)
        out = out * self.skip_gain[...].astype(self.dtype)
        return out * self.alpha + shortcut

    def _stochastic_depth(self, out: Array, rate: float | Array, rng: Array | None) -> Array:
        if rng is None:
            raise ValueError("NFBlock: train=True needs an `rng` key for stochastic depth")
        keep = 1.0 - jnp.asarray(rate, jnp.float32)
        # floor(keep + U[0,1)) is 1 with probability keep, and exactly 1 at rate 0: no branch needed.
        mask = jnp.floor(keep + jax.random.uniform(rng, (out.shape[0], 1, 1, 1), jnp.float32))
        if self.scale_by_keep:
            mask = mask / keep
        return out * mask.astype(out.dtype)


class NFStage(nnx.Module):
    """A stage: its transition block (stride, width change) and the stacked remaining blocks (or None)."""

    def __init__(self, in_ch: int, out_ch: int, depth: int, *, stride: int, block_kw: dict[str, Any], rngs: nnx.Rngs):
        self.first = NFBlock(in_ch, out_ch, stride=stride, rngs=rngs, **block_kw)
        make = lambda r: NFBlock(out_ch, out_ch, stride=1, rngs=r, **block_kw)
        self.rest = stacking.stack(make, depth - 1, rngs) if depth > 1 else None


def _call_block(block: NFBlock, x: Array, beta: Any, rate: Any, key: Array | None, train: bool, remat: str) -> Array:
    if remat == "none":
        return block(x, beta=beta, stochdepth_rate=rate, train=train, rng=key)
    graphdef, state = nnx.split(block)

    def f(state: nnx.State, x: Array, beta: Any, rate: Any, key: Array | None) -> Array:
        return nnx.merge(graphdef, state)(x, beta=beta, stochdepth_rate=rate, train=train, rng=key)

    f = jax.checkpoint(f, policy=stacking.REMAT_POLICIES[remat], prevent_cse=False)
    return f(state, x, beta, rate, key)


def resolve_architecture(
    variant: str | None, widths: Sequence[int] | None, depths: Sequence[int] | None, drop_rate: float | None
) -> tuple[tuple[int, ...], tuple[int, ...], float]:
    base: dict[str, Any] = {}
    if variant is not None:
        key = variant.upper()
        if key not in NFNET_VARIANTS:
            raise ValueError(f"unknown NFNet variant {variant!r}; choose one of {sorted(NFNET_VARIANTS)} or None")
        base = NFNET_VARIANTS[key]
    elif widths is None or depths is None:
        raise ValueError("NFNet(variant=None) needs explicit widths and depths")
    widths = tuple(int(w) for w in (widths if widths is not None else base["widths"]))
    depths = tuple(int(d) for d in (depths if depths is not None else base["depths"]))
    if drop_rate is None:
        drop_rate = base.get("drop_rate", 0.0)
    return widths, depths, float(drop_rate)


class NFNet(nnx.Module):
    """NFNet-F0..F7, or a custom-sized NF-ResNet, as a feature extractor or an image classifier.

    `features` gives the last stage's grid `[B, H/32, W/32, widths[-1]]` (what Flamingo's Perceiver Resampler
    consumes); `__call__` adds the classification head and needs `num_classes`.
    """

    def __init__(
        self,
        variant: str | None = "F0",
        *,
        widths: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        stem_widths: Sequence[int] | None = None,
        strides: Sequence[int] = DEFAULT_STRIDES,
        group_size: int = 128,
        num_classes: int | None = None,
        se_ratio: float = 0.5,
        alpha: float = 0.2,
        stochdepth_rate: float = 0.1,
        stochdepth_scale_by_keep: bool = True,
        drop_rate: float | None = None,
        final_conv_mult: float = 2.0,
        activation: str = "scaled_gelu",
        scan_blocks: bool = True,
        remat: str = "none",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        widths, depths, drop_rate = resolve_architecture(variant, widths, depths, drop_rate)
        strides = tuple(int(s) for s in strides)
        if not len(widths) == len(depths) == len(strides):
            raise ValueError(f"widths {widths}, depths {depths} and strides {strides} must have equal lengths")
        if any(d < 1 for d in depths):
            raise ValueError(f"depths {depths}: every stage needs at least one block")
        if stem_widths is None:
            stem_widths = (16, 32, 64)
        stem_widths = tuple(int(w) for w in stem_widths)
        if len(stem_widths) == 3:
            stem_widths = (*stem_widths, widths[0] // 2)
        if len(stem_widths) != 4:
            raise ValueError(f"stem_widths {stem_widths}: give 3 or 4 widths (the 4th defaults to widths[0] // 2)")
        bottlenecks = [int(w * BOTTLENECK_RATIO) for w in widths]
        if any(b < group_size or b % group_size for b in bottlenecks):
            raise ValueError(
                f"group_size={group_size} must divide every bottleneck width "
                f"({BOTTLENECK_RATIO} * widths = {bottlenecks})"
            )
        if not 0.0 <= stochdepth_rate < 1.0:
            raise ValueError(f"stochdepth_rate={stochdepth_rate} must be in [0, 1)")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate={drop_rate} must be in [0, 1)")
        if remat not in stacking.REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(stacking.REMAT_POLICIES)}")

        self.widths, self.depths, self.strides = widths, depths, strides
        self.drop_rate = drop_rate
        self.stochdepth_rate = stochdepth_rate
        self.scan_blocks = scan_blocks
        self.remat = remat
        self.dtype = dtype
        self.act = layers.activation(activation)
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        # Stem: three 3x3 convs (first strided), then a strided 3x3 to half the first stage width; no act at
        # the end because each block applies its own pre-activation.
        chans = (3, *stem_widths)
        self.stem = nnx.List(
            [WSConv2D(chans[i], chans[i + 1], 3, stride=2 if i in (0, 3) else 1, **conv) for i in range(4)]
        )

        # beta = 1/expected input std. As in the reference, a transition block sees the previous stage's
        # accumulated std; its output is reset to ~unit variance (the shortcut is a conv of a unit-variance
        # signal), after which each block adds alpha^2 to the variance.
        num_blocks = sum(depths)
        betas, rates = [], []
        expected_std = 1.0
        for d in depths:
            for j in range(d):
                betas.append(1.0 / expected_std)
                rates.append(stochdepth_rate * len(rates) / num_blocks)
                if j == 0:
                    expected_std = 1.0
                expected_std = math.sqrt(expected_std**2 + alpha**2)
        self.betas, self.block_rates = tuple(betas), tuple(rates)

        block_kw = dict(
            group_size=group_size,
            se_ratio=se_ratio,
            alpha=alpha,
            activation=activation,
            stochdepth_scale_by_keep=stochdepth_scale_by_keep,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        stages, ch = [], stem_widths[-1]
        for w, d, s in zip(widths, depths, strides):
            stages.append(NFStage(ch, w, d, stride=s, block_kw=block_kw, rngs=rngs))
            ch = w
        self.stages = nnx.List(stages)

        self.num_classes = num_classes
        if num_classes is None:
            self.final_conv = None
            self.fc = None
        else:
            final_ch = int(final_conv_mult * ch)
            self.final_conv = WSConv2D(ch, final_ch, 1, **conv)
            self.fc = layers.DenseGeneral(
                final_ch,
                num_classes,
                ("channels", "classes"),
                use_bias=True,
                kernel_init=nnx.initializers.normal(0.01),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    def _needs_rng(self, train: bool, head: bool) -> bool:
        return train and (self.stochdepth_rate > 0 or (head and self.drop_rate > 0))

    def features(self, images: Array, *, train: bool = False, rng: Array | None = None) -> Array:
        """The last stage's feature grid `[B, ceil(H/32), ceil(W/32), widths[-1]]` for NHWC float `images`."""
        if self._needs_rng(train, head=False) and rng is None:
            raise ValueError("NFNet.features(train=True) needs an `rng` key for stochastic depth")
        keys = jax.random.split(rng, self.num_blocks) if train and rng is not None else None
        out = images.astype(self.dtype)
        for i, conv in enumerate(self.stem):
            out = conv(out)
            if i < len(self.stem) - 1:
                out = self.act(out)
        out = sharding.constrain(out, _FEATURE_AXES)
        start = 0
        for stage, depth in zip(self.stages, self.depths):
            key = keys[start] if keys is not None else None
            out = _call_block(stage.first, out, self.betas[start], self.block_rates[start], key, train, self.remat)
            out = sharding.constrain(out, _FEATURE_AXES)
            if stage.rest is not None:
                out = self._apply_rest(stage.rest, out, start + 1, start + depth, keys, train)
            start += depth
        return out

    def _apply_rest(self, rest: NFBlock, x: Array, lo: int, hi: int, keys: Array | None, train: bool) -> Array:
        """Blocks `lo..hi-1` (one stacked module): a `lax.scan`, or an unrolled loop over per-block slices."""
        betas = jnp.asarray(np.asarray(self.betas[lo:hi], np.float32))
        rates = jnp.asarray(np.asarray(self.block_rates[lo:hi], np.float32))
        block_keys = keys[lo:hi] if keys is not None else None
        graphdef, state = nnx.split(rest)
        if self.scan_blocks:

            def body(block: NFBlock, carry: Array, xs: tuple) -> tuple[Array, None]:
                beta, rate, key = xs
                carry = block(carry, beta=beta, stochdepth_rate=rate, train=train, rng=key)
                return sharding.constrain(carry, _FEATURE_AXES), None

            x, _ = stacking.scan(body, graphdef, state, x, (betas, rates, block_keys), remat=self.remat)
            return x
        for i in range(hi - lo):
            block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            key = block_keys[i] if block_keys is not None else None
            x = _call_block(block, x, betas[i], rates[i], key, train, self.remat)
            x = sharding.constrain(x, _FEATURE_AXES)
        return x

    def __call__(self, images: Array, *, train: bool = False, rng: Array | None = None) -> dict[str, Array]:
        """`logits` [B, num_classes] (float32) and `pool` [B, final width] (before dropout)."""
        if self.final_conv is None or self.fc is None:
            raise ValueError("this NFNet was built with num_classes=None (features only); use .features()")
        if self._needs_rng(train, head=True) and rng is None:
            raise ValueError("NFNet(train=True) needs an `rng` key for stochastic depth and dropout")
        feat_key = drop_key = None
        if train and rng is not None:
            feat_key, drop_key = jax.random.split(rng)
        out = self.features(images, train=train, rng=feat_key)
        out = self.act(self.final_conv(out))
        pool = jnp.mean(out.astype(jnp.float32), axis=(1, 2))
        h = pool
        if train and self.drop_rate > 0:
            keep = 1.0 - self.drop_rate
            mask = jax.random.bernoulli(drop_key, keep, h.shape)
            h = jnp.where(mask, h / keep, 0.0)
        logits = self.fc(h.astype(self.dtype)).astype(jnp.float32)
        return dict(logits=logits, pool=pool)
