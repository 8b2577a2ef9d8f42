"""The device-side inputs of one jitted step (a pytree of arrays the model consumes)."""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    """One ragged step: T tokens of B sequences (shapes bucketed by the runner)."""

    tokens: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    slot_mapping: jax.Array  # [T] int32, page * page_size + offset; padding -> page 0
    page_table: jax.Array  # [B, maxP] int32
    cu_q_lens: jax.Array  # [B+1] int32
    kv_lens: jax.Array  # [B] int32, KV length including this step's tokens
    logits_indices: jax.Array  # [B] int32, the token row whose logits each sequence needs
    state_slots: jax.Array  # [B] int32, each sequence's recurrent-state slot (0: none / padding)
