"""Building blocks shared by every model: parameters with logical axes, dense layers, norms, activations.

Every parameter is an `nnx.Param` whose metadata `axes` names one logical axis per dimension (`embed`, `mlp`,
`heads`, ...). `flamingo_jax.sharding` maps those names to mesh axes; a name no rule covers is an error there, so
a layer that forgets to annotate a parameter is caught before any compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding

Array = jax.Array
Initializer = Callable[..., Array]

# NFNet's scaled activations keep the signal variance at ~1 for N(0, 1) inputs (Brock et al. 2021, table 6).
GELU_GAMMA = 1.7015043497085571
RELU_GAMMA = 1.7139588594436646


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """A parameter annotated with one logical axis name per dimension."""
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {tuple(shape)} needs {len(shape)} axis names, got {tuple(axes)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


def squared_relu(x: Array) -> Array:
    return jnp.square(jax.nn.relu(x))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "squared_relu": squared_relu,
    "scaled_gelu": lambda x: jax.nn.gelu(x, approximate=False) * GELU_GAMMA,
    # DeepMind's released NFNet weights were trained with haiku's (then tanh-approximate) gelu.
    "scaled_gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True) * GELU_GAMMA,
    "scaled_relu": lambda x: jax.nn.relu(x) * RELU_GAMMA,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def fan_in_init(scale: float = 1.0) -> Initializer:
    """Truncated-normal variance scaling on fan-in, computed from the contracting dims."""
    return nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class DenseGeneral(nnx.Module):
    """Contracts the last `len(in_shape)` dims of the input with a kernel of shape `in_shape + out_shape`.

    Multi-dimensional kernels (e.g. `[embed, heads, head_dim]`) let each dimension carry its own logical axis,
    so tensor parallelism splits whole heads rather than a flattened `heads * head_dim` dimension.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        axes: Sequence[str | None],
        *,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.dtype = dtype
        fan_in = math.prod(self.in_shape)
        if kernel_init is None:
            kernel_init = nnx.initializers.normal(1.0 / math.sqrt(fan_in))
        self.kernel = param(rngs, kernel_init, self.in_shape + self.out_shape, axes, param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros, self.out_shape, tuple(axes)[len(self.in_shape) :], param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_shape)
        kernel = self.kernel[...].astype(self.dtype)
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel,
            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Root-mean-square norm; statistics in float32 whatever the compute dtype."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        axis_name: str = "embed",
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with optional bias; statistics in float32 whatever the compute dtype."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        use_bias: bool = True,
        axis_name: str = "embed",
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), (axis_name,), param_dtype) if use_bias else None

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def make_norm(
    kind: str, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs, axis_name: str = "embed"
) -> RMSNorm | LayerNorm:
    if kind == "rms":
        return RMSNorm(dim, eps=eps, axis_name=axis_name, param_dtype=param_dtype, rngs=rngs)
    if kind == "layer":
        return LayerNorm(dim, eps=eps, axis_name=axis_name, param_dtype=param_dtype, rngs=rngs)
    if kind == "layer_nobias":
        return LayerNorm(dim, eps=eps, use_bias=False, axis_name=axis_name, param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"unknown norm {kind!r}; choose 'rms', 'layer' or 'layer_nobias'")


class FeedForward(nnx.Module):
    """`down(act(up(x)))`, or the gated form `down(act(gate(x)) * up(x))` (SwiGLU when act is silu)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        act: str,
        gated: bool = False,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = activation(act)
        self.gate = DenseGeneral(dim, hidden, ("embed", "mlp"), **kw) if gated else None
        self.up = DenseGeneral(dim, hidden, ("embed", "mlp"), **kw)
        self.down = DenseGeneral(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        h = self.up(x)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        h = sharding.constrain(h, ("batch", "length", "mlp"))
        return self.down(h)
