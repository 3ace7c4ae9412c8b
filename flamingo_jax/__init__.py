"""Flamingo-family visual language models in JAX and Flax NNX.

`import flamingo_jax` stays light: `load_exported` (see flamingo_jax.export) is imported on first use.
"""

from typing import Any

__all__ = ["load_exported"]


def __getattr__(name: str) -> Any:
    if name == "load_exported":
        from flamingo_jax.export import load_exported

        return load_exported
    raise AttributeError(f"module 'flamingo_jax' has no attribute {name!r}")
