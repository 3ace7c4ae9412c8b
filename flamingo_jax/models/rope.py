"""Rotary position embeddings (the half-split layout of HF LLaMA), with the RoPE scalings of current open LMs.

`LMConfig.rope_scaling` holds the scaling as sorted (key, value) pairs under the Hugging Face key names, e.g.
`(('factor', 8.0), ('high_freq_factor', 4.0), ('low_freq_factor', 1.0), ('original_max_position_embeddings', 8192),
('rope_type', 'llama3'))`; `()` is plain RoPE. The inverse frequencies and the attention factor are computed as
`transformers.modeling_rope_utils` does (`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`,
`_compute_yarn_parameters`), in float64 NumPy at trace time; YaRN's attention factor multiplies cos and sin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Scaling = tuple[tuple[str, Any], ...]

# rope_type -> (required keys, optional keys), besides rope_type itself.
SCALING_TYPES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "linear": (frozenset({"factor"}), frozenset()),
    "llama3": (
        frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
        frozenset(),
    ),
    "yarn": (
        frozenset({"factor", "original_max_position_embeddings"}),
        frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    ),
}

# Types refused with a reason (any other name is refused as unknown).
_REFUSED = {
    "dynamic": "dynamic NTK scaling changes the frequencies with the running sequence length",
    "longrope": "LongRoPE's per-frequency short/long factors are not implemented",
}


def normalise_scaling(value: Any) -> Any:
    """A dict, or (key, value) pairs (a JSON round trip gives lists), as sorted pairs; `()` for no scaling.

    Anything else is returned unchanged, for `validate_scaling` to name.
    """
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) for p in value
    ):
        items = [tuple(p) for p in value]
    else:
        return value
    items = [(str(k), tuple(v) if isinstance(v, list) else v) for k, v in items]
    if dict(items).get("rope_type") == "default" and len(items) == 1:
        return ()
    return tuple(sorted(items, key=lambda kv: kv[0]))


def check_type(kind: Any, where: str) -> None:
    """Fails, naming `where` and the supported types, unless `kind` is a supported scaling type."""
    if isinstance(kind, str) and kind in SCALING_TYPES:
        return
    reason = f" ({_REFUSED[kind]})" if isinstance(kind, str) and kind in _REFUSED else ""
    raise ValueError(
        f"{where}: rope_type {kind!r} is not supported{reason}; supported: {['default', *sorted(SCALING_TYPES)]}"
    )


def validate_scaling(scaling: Any, field: str) -> None:
    """Checks the type, the keys and the values of a normalised scaling; errors name `field`."""
    if scaling == ():
        return
    example = "e.g. dict(rope_type='llama3', factor=8.0, ...)"
    if not isinstance(scaling, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in scaling):
        raise ValueError(f"{field} must be a dict of Hugging Face rope parameters ({example}), got {scaling!r}")
    d = dict(scaling)
    if len(d) != len(scaling):
        raise ValueError(f"{field} repeats a key: {[k for k, _ in scaling]}")
    if "rope_type" not in d:
        raise ValueError(f"{field} needs a rope_type ({example}), got keys {sorted(d)}")
    kind = d["rope_type"]
    check_type(kind, field)
    required, optional = SCALING_TYPES[kind]
    missing = sorted(required - set(d))
    if missing:
        raise ValueError(f"{field}: rope_type {kind!r} needs {missing}")
    unknown = sorted(set(d) - required - optional - {"rope_type"})
    if unknown:
        hint = f" (set {field.rpartition('.')[0]}.rope_theta instead)" if "rope_theta" in unknown else ""
        raise ValueError(
            f"{field}: keys {unknown} are not used by rope_type {kind!r}{hint}; allowed: {sorted(required | optional)}"
        )
    for k, v in d.items():
        if k == "rope_type" or (v is None and k in optional):
            continue
        if k == "truncate":
            if not isinstance(v, bool):
                raise ValueError(f"{field}.truncate must be a bool, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{field}.{k} must be a number, got {v!r}")
    if not d["factor"] > 0:
        raise ValueError(f"{field}.factor must be positive, got {d['factor']}")
    if "original_max_position_embeddings" in d and not d["original_max_position_embeddings"] > 0:
        raise ValueError(f"{field}.original_max_position_embeddings must be positive")
    if kind == "llama3" and not d["high_freq_factor"] > d["low_freq_factor"] > 0:
        raise ValueError(
            f"{field}: llama3 needs high_freq_factor > low_freq_factor > 0, "
            f"got {d['high_freq_factor']} and {d['low_freq_factor']}"
        )


def inverse_frequencies(head_dim: int, theta: float, scaling: Scaling = ()) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim / 2] in float64, attention factor), as transformers computes them."""
    dim = head_dim
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if not scaling:
        return inv_freq, 1.0
    p = dict(scaling)
    kind, factor = p["rope_type"], float(p["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":

        def mscale_of(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
            else:
                attention_factor = mscale_of(factor)
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
        old_len = p["original_max_position_embeddings"]

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001  # as transformers: no division by zero
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        extrapolation = 1 - ramp
        interpolated = inv_freq / factor
        return interpolated * (1 - extrapolation) + inv_freq * extrapolation, float(attention_factor)
    check_type(kind, "rope_scaling")
    raise AssertionError(kind)


def rotary_tables(
    positions: Array, head_dim: int, theta: float, scaling: Scaling | Sequence = ()
) -> tuple[Array, Array]:
    """cos/sin tables [B, L, head_dim] for integer positions [B, L], times the scaling's attention factor."""
    inv_freq, attention_factor = inverse_frequencies(head_dim, theta, tuple(scaling))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates x [B, L, H, D] by the tables [B, L, D]; computed in float32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
