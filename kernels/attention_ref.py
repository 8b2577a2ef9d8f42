"""Pure-jnp paged attention: the reference every GPU kernel is tested against.

Pool layout (page-major: one page of every layer is contiguous, toolkit.cache.pool):
    k_pool, v_pool  [P, L, S, KV, Dh]     P pages of S tokens; page 0 = padding page
Ragged batch of B sequences, T query tokens in total:
    cu_q_lens  [B+1]  query offsets of each sequence into the T tokens
    kv_lens    [B]    tokens of KV in the pool for each sequence, *including* this
                      step's queries (their KV is written before attention runs)
    page_table [B, maxP]  page ids; entries past a sequence's length are ignored
A query at offset i of sequence b sits at position kv_lens[b] - q_len[b] + i and
attends to keys 0..position (causal). Padding sequences have q_len 0 or kv_len 0
and produce zeros.
"""

from __future__ import annotations

import jax.numpy as jnp

_NEG = -1e30  # finite so a fully masked row gives zeros, not NaN


def _gather_kv(pool, layer, page_table):
    """[P, L, S, KV, Dh] -> [B, maxP*S, KV, Dh] for one layer."""
    B, maxP = page_table.shape
    kv = pool[page_table, layer]  # [B, maxP, S, KV, Dh]
    return kv.reshape(B, maxP * kv.shape[2], *kv.shape[3:])


def _attend(q, k, v, mask, scale):
    """q [B, C, H, Dh], k/v [B, N, KV, Dh], mask [B, C, N] -> [B, C, H, Dh] (float32 math)."""
    B, C, H, Dh = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, C, KV, H // KV, Dh).astype(jnp.float32)
    s = jnp.einsum("bckgd,bnkd->bkgcn", qg, k.astype(jnp.float32)) * scale
    s = jnp.where(mask[:, None, None], s, _NEG)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    p = jnp.where(mask[:, None, None], p, 0.0)
    denom = jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    o = jnp.einsum("bkgcn,bnkd->bckgd", p / denom, v.astype(jnp.float32))
    return o.reshape(B, C, H, Dh)


def paged_decode_attention(q, k_pool, v_pool, layer, page_table, kv_lens, *, scale):
    """One query per sequence. q [B, H, Dh] -> [B, H, Dh]."""
    k = _gather_kv(k_pool, layer, page_table)
    v = _gather_kv(v_pool, layer, page_table)
    n = jnp.arange(k.shape[1])
    mask = (n[None, :] < kv_lens[:, None])[:, None, :]  # [B, 1, N]
    return _attend(q[:, None], k, v, mask, scale)[:, 0].astype(q.dtype)


def paged_prefill_attention(q, k_pool, v_pool, layer, page_table, cu_q_lens, kv_lens, *,
                            max_q_len, scale):
    """Ragged chunks. q [T, H, Dh] -> [T, H, Dh]; max_q_len (static) >= every q_len."""
    T = q.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [B]
    c = jnp.arange(max_q_len)
    tok = cu_q_lens[:-1, None] + c[None, :]  # [B, C] token index of each padded slot
    q_valid = c[None, :] < q_lens[:, None]
    qp = q[jnp.clip(tok, 0, T - 1)]  # [B, C, H, Dh]
    k = _gather_kv(k_pool, layer, page_table)
    v = _gather_kv(v_pool, layer, page_table)
    q_pos = (kv_lens - q_lens)[:, None] + c[None, :]  # [B, C]
    n = jnp.arange(k.shape[1])
    mask = (n[None, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]
    mask &= n[None, None, :] < kv_lens[:, None, None]
    op = _attend(qp, k, v, mask, scale)  # [B, C, H, Dh]
    # Back to ragged: token t belongs to the last sequence whose offset is <= t.
    t = jnp.arange(T)
    b = jnp.clip(jnp.sum(t[:, None] >= cu_q_lens[None, 1:], axis=1), 0, q_lens.shape[0] - 1)
    i = t - cu_q_lens[b]
    real = (t < cu_q_lens[-1])[:, None, None]
    out = op[b, jnp.clip(i, 0, max_q_len - 1)]
    return jnp.where(real, out, 0.0).astype(q.dtype)


def write_kv(k_pool, v_pool, layer, k, v, slot_mapping):
    """Scatter this step's K/V [T, KV, Dh] into flat slots (page * S + offset).

    Padding tokens carry slot 0..S-1 of page 0, the reserved padding page, so
    their writes land where nothing reads.
    """
    S = k_pool.shape[2]
    page, off = slot_mapping // S, slot_mapping % S
    k_pool = k_pool.at[page, layer, off].set(k.astype(k_pool.dtype))
    v_pool = v_pool.at[page, layer, off].set(v.astype(v_pool.dtype))
    return k_pool, v_pool


def gather_pages(pool, page_ids):
    """Copy pages (every layer) into one contiguous buffer: [P, L, ...] -> [n, L, ...]."""
    return pool[page_ids]


def scatter_pages(pool, page_ids, staged):
    """Inverse of gather_pages: write staged [n, L, ...] into pool pages (pool donated by callers)."""
    return pool.at[page_ids].set(staged.astype(pool.dtype))


def dense_causal_attention(q, k, v, *, scale):
    """Contiguous single-sequence oracle for tests: q [T, H, Dh], k/v [N, KV, Dh], queries at N-T..N-1."""
    T, N = q.shape[0], k.shape[0]
    pos = jnp.arange(N - T, N)
    mask = jnp.arange(N)[None, :] <= pos[:, None]
    return _attend(q[None], k[None], v[None], mask[None], scale)[0].astype(q.dtype)


def scattered_page_table(rng, pages_per_seq: list[int], num_pages: int, junk: bool = False):
    """Test and benchmark inputs: a page table [B, max(pages_per_seq)] int32 whose sequence b
    holds pages_per_seq[b] pages drawn from one random permutation of 1..num_pages-1 (no
    page shared, none adjacent by design; page 0 is the padding page). Entries past a
    sequence's pages are 0, or random page ids when ``junk`` (kernels must mask them by
    kv_lens)."""
    import numpy as np

    perm = rng.permutation(np.arange(1, num_pages))
    shape = (len(pages_per_seq), max(pages_per_seq))
    table = rng.integers(0, num_pages, shape, dtype=np.int32) if junk else np.zeros(shape, np.int32)
    off = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = perm[off:off + n]
        off += n
    return table
