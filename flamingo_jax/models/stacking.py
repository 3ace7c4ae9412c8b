"""Stacked layers and `lax.scan` over them, with selectable rematerialisation.

A stack of N identical layers is one module whose parameters have a leading `layers` dimension. Scanning over it
traces the layer once, so an 80-layer LM compiles in about the time of one layer, and the rematerialisation
policy is applied per layer (the usual trade: `full` recomputes everything in the backward pass, `dots` keeps
matmul outputs, `none` keeps all activations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _add_layers_axis(var: nnx.Variable) -> nnx.Variable:
    axes = var.get_metadata().get("axes")
    if axes is None:
        return var
    var.set_metadata("axes", ("layers", *axes))
    return var


def stack(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num` independently initialised copies of `make(rngs)`, as one module with a leading `layers` dim."""
    if num < 1:
        raise ValueError(f"cannot stack {num} layers")
    keys = jax.random.split(rngs.params(), num)

    def one(key: jax.Array) -> nnx.State:
        return nnx.split(make(nnx.Rngs(params=key)))[1]

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(params=0))))
    state = jax.vmap(one)(keys)
    state = jax.tree.map(_add_layers_axis, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def num_stacked(stacked: nnx.Module) -> int:
    return jax.tree.leaves(nnx.state(stacked))[0].shape[0]


def slice_stack(stacked_state: nnx.State, start: int, stop: int) -> nnx.State:
    return jax.tree.map(lambda x: x[start:stop], stacked_state)


def scan(
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    graphdef: nnx.GraphDef,
    stacked_state: nnx.State,
    carry: Any,
    xs: Any = None,
    *,
    remat: str = "none",
    unroll: int = 1,
) -> tuple[Any, Any]:
    """`lax.scan` of `body(layer, carry, x) -> (carry, y)` over the leading dim of `stacked_state` (and `xs`)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")

    def step(c: Any, inputs: tuple[nnx.State, Any]) -> tuple[Any, Any]:
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (stacked_state, xs), unroll=unroll)
