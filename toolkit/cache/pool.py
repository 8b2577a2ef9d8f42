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


KV_ALLOC = ("auto", "xla", "cuda_malloc")


class KVPool:
    """alloc: ``xla`` lets XLA allocate the buffers; ``cuda_malloc`` allocates them with
    cudaMalloc (through torch) and imports them zero-copy with DLPack. Why: JAX >= 0.11
    allocates every GPU buffer with CUDA VMM, which UCX's cuda_ipc transport cannot map
    (it needs legacy IPC handles), so NIXL VRAM writes between processes fall back to a
    software path at ~0.5 GB/s; cudaMalloc'd pools take cuda_ipc (measured in
    docs/benchmarks.md). Donated steps keep updating the imported buffers in place.
    ``auto``: cuda_malloc on a GPU when torch is importable, else xla."""

    def __init__(self, layout: PoolLayout, device=None, alloc: str = "auto"):
        self.layout = layout
        device = device or jax.devices()[0]
        self.alloc = resolve_alloc(alloc, device)
        self._owners = []  # keep cudaMalloc'd memory alive as long as the pool
        # Separate zeros per buffer: K and V must not alias each other.
        self.k, self.v = (self._zeros(device) for _ in range(2))

    def _zeros(self, device):
        if self.alloc == "xla":
            return jax.device_put(jnp.zeros(self.layout.shape, self.layout.dtype), device)
        import torch

        t = torch.zeros(self.layout.shape, dtype=getattr(torch, self.layout.dtype),
                        device=f"cuda:{getattr(device, 'local_hardware_id', None) or device.id}")
        self._owners.append(t)
        arr = jax.dlpack.from_dlpack(t)
        assert arr.unsafe_buffer_pointer() == t.data_ptr(), "DLPack import copied the pool"
        return arr

    def buffer_pointers(self) -> tuple[int, int]:
        return (self.k.unsafe_buffer_pointer(), self.v.unsafe_buffer_pointer())


def resolve_alloc(alloc: str, device) -> str:
    if alloc not in KV_ALLOC:
        raise ValueError(f"engine.kv_alloc={alloc!r}; allowed: {', '.join(KV_ALLOC)}")
    on_gpu = device.platform == "gpu"
    if alloc == "auto":
        if not on_gpu:
            return "xla"
        try:
            import torch

            return "cuda_malloc" if torch.cuda.is_available() else "xla"
        except ImportError:
            return "xla"
    if alloc == "cuda_malloc" and not on_gpu:
        raise ValueError("engine.kv_alloc=cuda_malloc needs a GPU; use xla or auto")
    return alloc
