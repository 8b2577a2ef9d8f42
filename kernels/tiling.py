"""How the prefill kernels cut a ragged batch of query chunks into tiles (pure jnp).

Both prefill kernels run one program per tile of q rows; these tables, computed on the
device before the kernel, tell each program which chunk (segment) it works on and where.
``cu_q_lens`` [B+1]: chunk i is rows cu_q_lens[i]:cu_q_lens[i+1] of q (see attention_ref).
The tables have a static number of slots (a bound computed from static shapes); slots
past the last tile are marked so that their programs do nothing.

- ``prefill_blocks``: blocks that start at their chunk's first row and never cross a
  chunk (the Triton-lowered kernel, attention_pallas: it gathers q rows itself).
- ``aligned_tiles``: blocks aligned to multiples of the tile (the Mosaic GPU kernel,
  attention_mgpu: TMA reads q in place at aligned rows; a block shared by two chunks
  is one tile of each).
"""

from __future__ import annotations

import jax.numpy as jnp


def segment_slots(counts, num_slots: int):
    """Number the items of consecutive segments (counts[i] items in segment i) over
    num_slots slots: (segment of each slot, its index within that segment, whether the
    slot holds an item at all; unused slots are past every item)."""
    cum = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    i = jnp.arange(num_slots, dtype=jnp.int32)
    seg = jnp.clip(jnp.searchsorted(cum, i, side="right").astype(jnp.int32) - 1, 0, counts.shape[0] - 1)
    return seg, i - cum[seg], i < cum[-1]


def prefill_blocks(cu_q_lens, num_blocks: int, block_q: int):
    """Cut the ragged queries into blocks of at most block_q tokens that never cross a
    sequence: (sequence of each block, first token of each block). Unused blocks get a
    start past their sequence's end, so they do nothing."""
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    seq, k, used = segment_slots((q_lens + block_q - 1) // block_q, num_blocks)
    start = jnp.where(used, cu_q_lens[seq] + k * block_q, cu_q_lens[seq + 1])
    return seq, start.astype(jnp.int32)


def aligned_tiles(cu_q_lens, num_tiles: int, tile: int):
    """Tiles of q rows aligned to multiples of ``tile``: one per (segment, aligned block it
    touches), segment i = rows cu_q_lens[i]:cu_q_lens[i+1]. -> (segment of each of the
    num_tiles tiles, its block index; -1 for unused tiles)."""
    cs, ce = cu_q_lens[:-1], cu_q_lens[1:]
    seg, k, used = segment_slots(jnp.where(ce > cs, (ce + tile - 1) // tile - cs // tile, 0), num_tiles)
    return seg, jnp.where(used, cs[seg] // tile + k, -1).astype(jnp.int32)
