"""The KV pool: two device buffers allocated once and donated through every step.

    k, v  [P, L, S, KV, Dh]   page-major: one page of every layer is contiguous
                              (L*S*KV*Dh elements); page 0 is the padding page

Why page-major: a transfer or a tier copy moves whole pages, and a page that is one
contiguous piece of each buffer is one descriptor (two per page: K and V) instead of one
per layer (docs/benchmarks.md: a scattered descriptor costs ~7 us on an H200 whatever its
size, so 32 KiB pieces ran at 0.004 of copy speed). Attention reads one layer at a time,
``pool[page, layer]``, an [S, KV, Dh] tile exactly as before; only its stride changed.

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

PAGE_MAJOR = "page_major"  # [P, L, S, KV, Dh]: the name peers compare at handshake


class LayoutMismatch(ValueError):
    pass


class PlacedLayout:
    """What the KV and state pool layouts share (both frozen dataclasses with ``mem_type``,
    ``device_id``, ``addresses`` fields): placing, the peer check of the fields in
    ``AGREE`` (naming the first that differs), and the handshake's JSON."""

    AGREE: tuple[str, ...] = ()
    KIND = ""  # what a mismatch message calls it

    def placed(self, mem_type: str, device_id: int, addresses):
        return dataclasses.replace(self, mem_type=mem_type, device_id=int(device_id),
                                   addresses=tuple(int(a) for a in addresses))

    def check_compatible(self, other) -> None:
        """Raise LayoutMismatch naming the first field where the two pools differ."""
        for f in self.AGREE:
            mine, theirs = getattr(self, f), getattr(other, f)
            if mine != theirs:
                raise LayoutMismatch(f"{self.KIND} layout mismatch: {f} is {mine!r} here and {theirs!r} on the peer")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["addresses"] = [int(a) for a in self.addresses]
        return d

    @classmethod
    def from_json(cls, d: dict):
        """The peer's handshake payload (malformed: TypeError/ValueError/KeyError); whether it
        matches this side is ``check_compatible``'s to say."""
        d = dict(d)
        d["addresses"] = tuple(int(a) for a in d.get("addresses", ()))
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class PoolLayout(PlacedLayout):
    """The one description of a KV pool: its shape and order (what two peers must agree on)
    and, once allocated, where its buffers are (what a transfer backend registers).

    A layout from ``for_model`` is not placed (no addresses); ``KVPool.describe()`` and the
    handshake carry a placed one."""

    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    order: str = PAGE_MAJOR
    mem_type: str = "DRAM"  # "DRAM" (host arrays) or "VRAM" (GPU arrays)
    device_id: int = 0
    addresses: tuple[int, ...] = ()  # one base address per buffer (K, V)

    # Fields two pools must share for pages to move between them (num_pages may differ);
    # ``order`` first: a peer of another order (an older build) fails on it, naming both.
    AGREE = ("order", "num_layers", "page_size", "num_kv_heads", "head_dim", "dtype", "num_buffers")
    KIND = "KV"

    @property
    def shape(self) -> tuple[int, ...]:
        """[P, L, S, KV, Dh] of each buffer."""
        return (self.num_pages, self.num_layers, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def layer_page_bytes(self) -> int:
        """Bytes of one page of one layer of one buffer: the tile attention reads."""
        return self.page_size * self.num_kv_heads * self.head_dim * np.dtype(self.dtype).itemsize

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of every layer of one buffer: one contiguous piece, the unit a
        transfer (or a tier copy) moves; K and V of a page are two of them."""
        return self.num_layers * self.layer_page_bytes

    @property
    def buffer_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def total_bytes(self) -> int:
        return 2 * self.buffer_bytes

    @property
    def num_buffers(self) -> int:
        return len(self.addresses) if self.addresses else 2

    @classmethod
    def for_model(cls, args: ModelArgs, num_pages: int, page_size: int, dtype) -> "PoolLayout":
        """The attention layers' pool (a hybrid's Mamba2 layers keep state, not pages)."""
        return cls(args.num_attn_layers, num_pages, page_size, args.num_kv_heads, args.head_dim,
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
        return device_zeros(self.layout.shape, self.layout.dtype, device, self.alloc, self._owners)

    def buffer_pointers(self) -> tuple[int, int]:
        return (self.k.unsafe_buffer_pointer(), self.v.unsafe_buffer_pointer())

    def describe(self) -> PoolLayout:
        """The placed layout: what a transfer backend registers and sends at handshake."""
        dev = self.k.devices().pop()
        on_gpu = dev.platform == "gpu"
        return self.layout.placed("VRAM" if on_gpu else "DRAM", dev.id if on_gpu else 0, self.buffer_pointers())


def device_zeros(shape, dtype: str, device, alloc: str, owners: list):
    """A zero buffer placed by ``alloc`` (resolved: xla | cuda_malloc); a cudaMalloc'd one
    is kept alive by appending its torch tensor to ``owners``."""
    if alloc == "xla":
        return jax.device_put(jnp.zeros(shape, dtype), device)
    import torch

    t = torch.zeros(shape, dtype=getattr(torch, np.dtype(dtype).name),
                    device=f"cuda:{getattr(device, 'local_hardware_id', None) or device.id}")
    owners.append(t)
    arr = jax.dlpack.from_dlpack(t)
    assert arr.unsafe_buffer_pointer() == t.data_ptr(), "DLPack import copied the buffer"
    return arr


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
