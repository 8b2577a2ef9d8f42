"""The attention interface the model calls, and the choice of implementation.

Every backend provides the same four functions with the signatures of
``attention_ref``; GPU kernels plug in here without the model changing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from kernels import attention_pallas, attention_ref


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

# Pallas kernels: compiled through Triton on a GPU, interpret mode elsewhere (slow; tests).
# Head dims that are not powers of two fall back to the reference inside each function.
PALLAS = AttentionBackend(
    name="pallas",
    decode=attention_pallas.paged_decode_attention,
    prefill=attention_pallas.paged_prefill_attention,
    write_kv=attention_pallas.write_kv,
)

BACKENDS = {"reference": REFERENCE, "pallas": PALLAS}
CHOICES = ("auto", "reference", "pallas")


def get_backend(name: str) -> AttentionBackend:
    """``auto`` picks the Pallas kernels on a GPU and the jnp reference elsewhere."""
    if name == "auto":
        name = "pallas" if jax.devices()[0].platform == "gpu" else "reference"
    if name not in BACKENDS:
        raise ValueError(f"engine.attention_backend={name!r}; allowed: {', '.join(CHOICES)}")
    return BACKENDS[name]
