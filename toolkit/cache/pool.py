"""The KV pool: two device buffers allocated once and donated through every step.

    k, v  [L, P, S, KV, Dh]   one page of one layer is contiguous (S*KV*Dh elements)

Jitted steps take the buffers as donated arguments and return them, so XLA
updates them in place and their device addresses never change; that is what
lets a transfer backend register them once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from toolkit.models.spec import ModelArgs


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer of K (or V)."""
        return self.page_size * self.num_kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    @property
    def total_bytes(self) -> int:
        return 2 * self.num_layers * self.num_pages * self.page_bytes

    @classmethod
    def for_model(cls, args: ModelArgs, num_pages: int, page_size: int, dtype) -> "PoolLayout":
        return cls(args.num_layers, num_pages, page_size, args.num_kv_heads, args.head_dim,
                   np.dtype(dtype).name)


class KVPool:
    def __init__(self, layout: PoolLayout, device=None):
        self.layout = layout
        device = device or jax.devices()[0]
        # Separate zeros per buffer: K and V must not alias each other.
        self.k = jax.device_put(jnp.zeros(layout.shape, layout.dtype), device)
        self.v = jax.device_put(jnp.zeros(layout.shape, layout.dtype), device)

    def buffer_pointers(self) -> tuple[int, int]:
        return (self.k.unsafe_buffer_pointer(), self.v.unsafe_buffer_pointer())
