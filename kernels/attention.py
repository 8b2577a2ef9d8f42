"""The attention interface the model calls, and the choice of implementation.

Every backend provides the same three functions (decode, prefill, write_kv) with the
signatures of ``attention_ref``; GPU kernels plug in here without the model changing.

Importing this module loads no kernel code: the Pallas backend's modules (Triton
lowering, Mosaic GPU) are imported when that backend is first asked for, so config
validation can read ``CHOICES`` cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from kernels import attention_ref


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    name: str
    decode: Callable  # paged_decode_attention(q, k_pool, v_pool, layer, page_table, kv_lens, *, scale)
    prefill: Callable  # paged_prefill_attention(q, k_pool, v_pool, layer, page_table, cu_q_lens, kv_lens, *, max_q_len, scale)
    write_kv: Callable  # write_kv(k_pool, v_pool, layer, k, v, slot_mapping)


REFERENCE = AttentionBackend(
    name="reference",
    decode=attention_ref.paged_decode_attention,
    prefill=attention_ref.paged_prefill_attention,
    write_kv=attention_ref.write_kv,
)

PREFILL_IMPLS = ("auto", "mgpu", "triton")


def _on_gpu() -> bool:
    import jax

    return jax.devices()[0].platform == "gpu"


def paged_prefill_attention(q, k_pool, v_pool, layer, page_table, cu_q_lens, kv_lens, *,
                            max_q_len, scale, block_q: int = 128, block_k: int = 128,
                            num_warps: int = 8, num_stages: int = 3, poison: bool = False,
                            impl: str = "auto"):
    """The Pallas backend's prefill: ragged chunks, q [T, H, Dh] -> [T, H, Dh].

    impl: ``mgpu`` (Mosaic GPU, attention_mgpu: 16-bit, head dim 64/128, page size a
    multiple of 8; runs in its CPU interpreter off a GPU), ``triton`` (attention_pallas'
    Triton-lowered kernel; interpret mode off a GPU), ``auto``: mgpu on a GPU where it
    applies, else triton (kernels/NOTES.md: 1.0x vs 0.55x cuDNN). The tile arguments
    (block_q, block_k, num_warps, num_stages) are the Triton kernel's; the Mosaic GPU
    kernel keeps its own tiles."""
    if impl not in PREFILL_IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {', '.join(PREFILL_IMPLS)}")
    if impl != "triton":
        from kernels import attention_mgpu

        if impl == "auto":
            impl = "mgpu" if _on_gpu() and attention_mgpu.supported(q.dtype, q.shape[2], k_pool.shape[2]) else "triton"
        if impl == "mgpu":
            return attention_mgpu.paged_prefill_attention(q, k_pool, v_pool, layer, page_table, cu_q_lens,
                                                          kv_lens, scale=scale, poison=poison)
    from kernels import attention_pallas

    return attention_pallas.paged_prefill_attention(
        q, k_pool, v_pool, layer, page_table, cu_q_lens, kv_lens, max_q_len=max_q_len, scale=scale,
        block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages, poison=poison)


def _pallas() -> AttentionBackend:
    """Pallas kernels: compiled through Triton (decode, write_kv, prefill off Hopper's
    16-bit path) or Mosaic GPU (prefill) on a GPU, interpret mode elsewhere (slow; tests).
    Head dims that are not powers of two fall back to the reference inside each function."""
    from kernels import attention_pallas

    if _on_gpu():
        # Now, not at the first lowering: an executable loaded from the engine's step store
        # (never lowered in this process) calls Mosaic GPU's runtime, which its custom call
        # finds through the environment variable this import sets.
        from kernels import attention_mgpu  # noqa: F401
    return AttentionBackend(name="pallas", decode=attention_pallas.paged_decode_attention,
                            prefill=paged_prefill_attention, write_kv=attention_pallas.write_kv)


# name -> how to build it (imports happen here, on first use)
_BUILDERS: dict[str, Callable[[], AttentionBackend]] = {"reference": lambda: REFERENCE, "pallas": _pallas}
CHOICES = ("auto", *_BUILDERS)  # engine.attention_backend


@functools.cache
def _build(name: str) -> AttentionBackend:
    return _BUILDERS[name]()  # one object per name: a backend compares equal across calls


def get_backend(name: str) -> AttentionBackend:
    """``auto`` picks the Pallas kernels on a GPU and the jnp reference elsewhere."""
    if name == "auto":
        name = "pallas" if _on_gpu() else "reference"
    if name not in _BUILDERS:
        raise ValueError(f"engine.attention_backend={name!r}; allowed: {', '.join(CHOICES)}")
    return _build(name)
