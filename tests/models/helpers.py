"""Shared test helpers for model tests."""

import jax
from flax import nnx


def randomize(model: nnx.Module, seed: int, scale: float = 0.5, only=nnx.Param) -> None:
    """Replace parameters with fresh random values (vectors around 1, so norm scales are not trivial; scalars
    such as gates around 0.5) so no test passes because something was initialised to zero or one."""
    state = nnx.state(model, only)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = []
    for k, x in zip(keys, leaves):
        offset = 1.0 if x.ndim == 1 else (0.5 if x.ndim == 0 else 0.0)
        new.append((scale * jax.random.normal(k, x.shape, jax.numpy.float32) + offset).astype(x.dtype))
    nnx.update(model, jax.tree.unflatten(treedef, new))
