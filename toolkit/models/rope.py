"""Rotary position embedding in HF "rotate_half" order, with the checkpoint's scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """[Dh/2] float64 inverse frequencies, scaled as the checkpoint asks."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        out = np.where(wavelen > old_len / low, inv / factor, inv)
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return np.where(is_mid, mid, out)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")


def apply_rope(x, positions, inv_freq: np.ndarray):
    """x [T, N, Dh], positions [T] -> x rotated; math in float32."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None]  # [T, Dh/2]
    cos, sin = jnp.cos(freqs)[:, None], jnp.sin(freqs)[:, None]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
