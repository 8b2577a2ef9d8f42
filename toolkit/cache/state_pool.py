"""The recurrent-state pool of hybrid models: two device buffers allocated once, donated
through every step, beside the KV pool.

    conv  [R, Lm, C, K-1]   model dtype: per slot and Mamba2 layer, the last K-1 inputs of
                            the depthwise causal conv (C = conv_dim)
    ssm   [R, Lm, H, P, N]  float32 (as transformers, SGLang and vLLM keep it, even for
                            bf16 models): the SSM state

Slot-major like the KV pool is page-major: one slot of every layer is one contiguous piece
of each buffer, so moving a request's state between workers is one descriptor per buffer.
Slot 0 is the padding slot (padding sequences read and write it); the slots themselves
are handed out by ``toolkit.cache.manager.CacheManager`` with the same deferred-release
rules as pages. A slot is not cleared when it is reused: the step starts a sequence whose
first token is at position 0 from zeros, whatever its slot holds.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from toolkit.cache.pool import PlacedLayout, device_zeros, resolve_alloc
from toolkit.models.spec import ModelArgs


@dataclasses.dataclass(frozen=True)
class StateLayout(PlacedLayout):
    """What two peers must agree on to move state slots (the slot count may differ), and,
    once allocated, where the buffers are."""

    num_slots: int
    num_layers: int  # Lm: the Mamba2 layers
    conv_dim: int
    conv_width: int  # K - 1
    num_heads: int
    head_dim: int
    state_size: int
    conv_dtype: str
    ssm_dtype: str = "float32"
    mem_type: str = "DRAM"
    device_id: int = 0
    addresses: tuple[int, ...] = ()  # conv, ssm

    AGREE = ("num_layers", "conv_dim", "conv_width", "num_heads", "head_dim", "state_size",
             "conv_dtype", "ssm_dtype")
    KIND = "state"

    @classmethod
    def for_model(cls, args: ModelArgs, num_slots: int, dtype) -> "StateLayout":
        from toolkit.models.mamba2 import MambaArgs

        m = MambaArgs.from_dict(args.mamba)
        return cls(num_slots, args.num_mamba_layers, m.conv_dim, m.conv_kernel - 1, m.num_heads,
                   m.head_dim, m.state_size, np.dtype(dtype).name)

    @property
    def conv_shape(self) -> tuple[int, ...]:
        return (self.num_slots, self.num_layers, self.conv_dim, self.conv_width)

    @property
    def ssm_shape(self) -> tuple[int, ...]:
        return (self.num_slots, self.num_layers, self.num_heads, self.head_dim, self.state_size)

    @property
    def slot_bytes(self) -> tuple[int, int]:
        """Bytes of one slot (every layer) of each buffer: the contiguous pieces a transfer moves."""
        conv = self.num_layers * self.conv_dim * self.conv_width * np.dtype(self.conv_dtype).itemsize
        ssm = self.num_layers * self.num_heads * self.head_dim * self.state_size * np.dtype(self.ssm_dtype).itemsize
        return conv, ssm

    @property
    def total_slot_bytes(self) -> int:
        return sum(self.slot_bytes)


class StatePool:
    """The two state buffers; ``alloc`` as ``engine.kv_alloc`` (cudaMalloc'd on a GPU so
    NIXL's cuda_ipc can map them, like the KV pool)."""

    def __init__(self, layout: StateLayout, device=None, alloc: str = "auto"):
        self.layout = layout
        device = device or jax.devices()[0]
        self.alloc = resolve_alloc(alloc, device)
        self._owners: list = []
        self.conv = device_zeros(layout.conv_shape, layout.conv_dtype, device, self.alloc, self._owners)
        self.ssm = device_zeros(layout.ssm_shape, layout.ssm_dtype, device, self.alloc, self._owners)

    @property
    def buffers(self) -> tuple[jax.Array, jax.Array]:
        return self.conv, self.ssm

    def buffer_pointers(self) -> tuple[int, int]:
        return (self.conv.unsafe_buffer_pointer(), self.ssm.unsafe_buffer_pointer())

    def describe(self) -> StateLayout:
        """The placed layout: what a transfer backend registers and sends at handshake."""
        dev = self.conv.devices().pop()
        on_gpu = dev.platform == "gpu"
        return self.layout.placed("VRAM" if on_gpu else "DRAM", dev.id if on_gpu else 0, self.buffer_pointers())


def required_slots(max_running: int, transfer_rooms: int) -> int:
    """State slots the pool needs: (requests holding a slot at once) x 1 per request + the
    padding slot. Holding at once: the running batch, plus on a P/D worker the rooms of
    transfers (decode: the rooms pre-allocated for transfers; prefill: the rooms whose
    transfers have not ended: a finished prefill keeps its slot until the last chunk, which
    carries the state, has landed)."""
    return max_running + transfer_rooms + 1
