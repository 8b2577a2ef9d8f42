"""Pallas paged-attention and KV-movement kernels for NVIDIA GPUs (Triton lowering).

Same signatures and semantics as ``attention_ref`` (the jnp reference beside this file,
which documents the pool layout and the ragged batch). On a GPU the kernels compile
through Pallas' Triton lowering; anywhere else they run in Pallas interpret mode, which
is how the CPU test suite checks them.

Kernels
- ``paged_decode_attention``: one query per sequence. Grid (sequence, KV head, split):
  each program loads the G query heads of its KV head as one [Gp, D] tile (G padded to
  16 for the tensor cores), walks its split of the context ``block_k`` tokens at a time
  (K/V rows gathered through the page table, any page size), keeps an online softmax,
  and writes its normalised partial output and log-sum-exp. Splits are merged with a
  log-sum-exp weighting in jnp (flash-decoding); the number of splits is picked from the
  static shapes so short batches of long contexts still fill the GPU.
- ``paged_prefill_attention``: ragged chunks. The query tokens are cut into blocks that
  never cross a sequence (``tiling.prefill_blocks``); grid (query block, KV head). A
  tile's ``block_q`` rows are the block's tokens x the query heads of that KV head (GQA
  packing: each K/V tile is read once for all of them). Each program first runs over the key blocks every one of its
  queries sees in full (no mask), then over the diagonal blocks with the causal mask.
- ``write_kv``: this step's K/V rows into their slots, the pool aliased in place.
- ``gather_pages`` / ``scatter_pages``: pages of every layer to or from a contiguous
  page-major staging buffer (transfer staging, host offload).

Head dims must be powers of two (>= 16); other shapes fall back to the reference.
The Mosaic GPU prefill kernel lives in ``attention_mgpu``; which of the two prefill kernels
runs is decided in ``kernels.attention``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import attention_ref as ref
from kernels.tiling import prefill_blocks

_NEG = -1e30  # finite: a fully masked row gives zeros, not NaN
_LOG2E = math.log2(math.e)
_MIN_ROWS = 16  # smallest M of a tensor-core dot


def _interpret() -> bool:
    return jax.devices()[0].platform != "gpu"


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _scalar(x):
    return jnp.reshape(jnp.asarray(x, jnp.int32), (1,))


def supported(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim == _pow2(head_dim)


def _dot(a, b, *, trans_b=False):
    """Tensor-core dot with float32 accumulation; exact float32 (no TF32) for float32 inputs."""
    if a.dtype == jnp.float32:
        return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False)
    return plgpu.dot(a, b, trans_b=trans_b)


def _online_softmax(o, m, l, s, v):
    """One key block of flash attention: logits s (log2 units) [R, N], values v [N, D]."""
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    return o * alpha[:, None] + _dot(p.astype(v.dtype), v), m_new, l * alpha + p.sum(axis=1)


def _params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _call(kernel, args, out_shape, *, grid, name, params, poison=False, aliases=None):
    """pallas_call on GPU (Triton) or in interpret mode elsewhere.

    poison=True (tests) passes NaN-filled output buffers aliased to the outputs, so an
    element the kernel never writes shows up as NaN instead of stale memory.
    """
    outs = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
    n = len(args)
    if poison and not aliases:
        args = (*args, *(jnp.full(o.shape, jnp.nan, o.dtype) for o in outs))
        aliases = {n + i: i for i in range(len(outs))}
        inner = kernel
        kernel = lambda *refs: inner(*refs[:n], *refs[n + len(outs):])  # noqa: E731
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, input_output_aliases=aliases or {},
                          compiler_params=params, interpret=_interpret(), name=name)(*args)


# ----------------------------------------------------------------------------- decode

def _decode_kernel(layer_ref, pt_ref, lens_ref, q_ref, k_ref, v_ref, o_ref, lse_ref=None, *,
                   G: int, Gp: int, block_k: int, split_tokens: int, scale: float):
    b, kvh, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    D = q_ref.shape[-1]
    S = k_ref.shape[2]
    layer = layer_ref[0]
    n = lens_ref[b]
    g = jnp.arange(Gp)[:, None]
    d = jnp.arange(D)[None, :]  # all-integer indexers: gathers that interpret mode also runs
    q = plgpu.load(q_ref.at[b, kvh * G + g, d], mask=jnp.broadcast_to(g < G, (Gp, D)), other=0)
    q = (q.astype(jnp.float32) * (scale * _LOG2E)).astype(q_ref.dtype)  # logits in log2 units
    start = sp * split_tokens
    end = jnp.minimum(n, start + split_tokens)
    nblk = (jnp.maximum(end - start, 0) + block_k - 1) // block_k

    def body(i, carry):
        o, m, l = carry
        tok = start + i * block_k + jnp.arange(block_k)
        valid = tok < end
        page = plgpu.load(pt_ref.at[b, tok // S], mask=valid, other=0)  # page 0: padding, safe to read
        page, off = page[:, None], (tok % S)[:, None]
        k = k_ref[page, layer, off, kvh, d]  # [block_k, D]
        v = v_ref[page, layer, off, kvh, d]
        s = _dot(q, k, trans_b=True)  # [Gp, block_k]
        return _online_softmax(o, m, l, jnp.where(valid[None, :], s, _NEG), v)

    init = (jnp.zeros((Gp, D), jnp.float32), jnp.full((Gp,), _NEG, jnp.float32),
            jnp.zeros((Gp,), jnp.float32))
    o, m, l = lax.fori_loop(0, nblk, body, init)
    has = l > 0
    o = jnp.where(has[:, None], o / jnp.where(has, l, 1.0)[:, None], 0.0)
    rows = jnp.broadcast_to(g < G, (Gp, D))  # only the G real heads are stored
    if lse_ref is None:  # one split: the final output, no merge
        plgpu.store(o_ref.at[b, kvh * G + g, d], o.astype(o_ref.dtype), mask=rows)
    else:
        plgpu.store(o_ref.at[b, kvh, sp, g, d], o, mask=rows)
        lse = jnp.where(has, m + jnp.log2(jnp.where(has, l, 1.0)), _NEG)
        plgpu.store(lse_ref.at[b, kvh, sp, g[:, 0]], lse, mask=g[:, 0] < G)


def decode_splits(B: int, KV: int, max_tokens: int, block_k: int, *, target_programs: int = 512,
                  min_split_tokens: int = 128) -> int:
    """Static number of context splits: enough programs to fill the GPU (about four per SM),
    none shorter than ``min_split_tokens``. One split needs no merge and is the fastest
    whenever B * KV alone fills the GPU (H200, B=64 ctx=2048: 0.92 of the copy ceiling with
    one split, 0.83 with two; kernels/NOTES.md)."""
    most = max(1, -(-max_tokens // max(min_split_tokens, block_k)))
    want = max(1, -(-target_programs // (B * KV)))
    return min(most, want)


def paged_decode_attention(q, k_pool, v_pool, layer, page_table, kv_lens, *, scale,
                           block_k: int = 64, num_splits: int | None = None, num_warps: int = 4,
                           num_stages: int = 2, poison: bool = False):
    """One query per sequence. q [B, H, Dh] -> [B, H, Dh]."""
    B, H, D = q.shape
    S, KV = k_pool.shape[2:4]
    if not supported(D):
        return ref.paged_decode_attention(q, k_pool, v_pool, layer, page_table, kv_lens, scale=scale)
    G = H // KV
    Gp = max(_MIN_ROWS, _pow2(G))
    max_tokens = page_table.shape[1] * S
    NS = num_splits or decode_splits(B, KV, max_tokens, block_k)
    split_tokens = -(-max_tokens // NS)
    split_tokens = -(-split_tokens // block_k) * block_k
    kernel = functools.partial(_decode_kernel, G=G, Gp=Gp, block_k=block_k, split_tokens=split_tokens,
                               scale=float(scale))
    args = (_scalar(layer), page_table.astype(jnp.int32), kv_lens.astype(jnp.int32), q, k_pool, v_pool)
    common = dict(grid=(B, KV, NS), name=f"paged_decode_bk{block_k}_ns{NS}",
                  params=_params(num_warps, num_stages), poison=poison)
    if NS == 1:
        return _call(kernel, args, jax.ShapeDtypeStruct((B, H, D), q.dtype), **common)
    o, lse = _call(kernel, args, [jax.ShapeDtypeStruct((B, KV, NS, G, D), jnp.float32),
                                  jax.ShapeDtypeStruct((B, KV, NS, G), jnp.float32)], **common)
    # flash-decoding merge of the splits' partial outputs (log2 units)
    mx = lse.max(axis=2, keepdims=True)
    w = jnp.where(lse > _NEG / 2, jnp.exp2(lse - mx), 0.0)  # [B, KV, NS, G]
    out = (o * w[..., None]).sum(2) / jnp.maximum(w.sum(2), 1e-30)[..., None]
    return out.reshape(B, H, D).astype(q.dtype)


# ---------------------------------------------------------------------------- prefill

def _prefill_kernel(layer_ref, pt_ref, lens_ref, cu_ref, bseq_ref, bstart_ref, q_ref, k_ref, v_ref,
                    o_ref, *, G: int, Gp: int, block_t: int, block_k: int, scale: float):
    """Rows of the tile = block_t query tokens x the Gp query heads of one KV head (GQA
    packing: each K/V tile is loaded once for all heads that share it)."""
    i, kvh = pl.program_id(0), pl.program_id(1)
    R = block_t * Gp
    D = q_ref.shape[-1]
    S = k_ref.shape[2]
    layer = layer_ref[0]
    b = bseq_ref[i]
    qs = bstart_ref[i]
    c0, c1 = cu_ref[b], cu_ref[b + 1]
    n = lens_ref[b]
    qe = jnp.minimum(qs + block_t, c1)
    r = jnp.arange(R)
    t, g = r // Gp, r % Gp
    rows = (qs + t)[:, None]
    heads = (kvh * G + g)[:, None]
    d = jnp.arange(D)[None, :]
    rmask = jnp.broadcast_to(((qs + t < qe) & (g < G))[:, None], (R, D))
    q = plgpu.load(q_ref.at[rows, heads, d], mask=rmask, other=0)
    q = (q.astype(jnp.float32) * (scale * _LOG2E)).astype(q_ref.dtype)
    first = n - (c1 - c0) + (qs - c0)  # position of the block's first query token
    pos = first + t
    last = first + (qe - qs) - 1
    kv_end = jnp.where(qe > qs, jnp.minimum(n, last + 1), 0)
    n_full = jnp.where(qe > qs, jnp.maximum(first + 1, 0) // block_k, 0)  # blocks every row sees
    n_all = (kv_end + block_k - 1) // block_k

    def step(j, carry, masked):
        o, m, l = carry
        kt = j * block_k + jnp.arange(block_k)
        if masked:
            page = plgpu.load(pt_ref.at[b, kt // S], mask=kt < n, other=0)
        else:
            page = pt_ref[b, kt // S]
        page, off = page[:, None], (kt % S)[:, None]
        k = k_ref[page, layer, off, kvh, d]
        v = v_ref[page, layer, off, kvh, d]
        s = _dot(q, k, trans_b=True)  # [R, block_k]
        if masked:
            s = jnp.where((kt[None, :] <= pos[:, None]) & (kt[None, :] < n), s, _NEG)
        return _online_softmax(o, m, l, s, v)

    init = (jnp.zeros((R, D), jnp.float32), jnp.full((R,), _NEG, jnp.float32), jnp.zeros((R,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), init)
    o, m, l = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), carry)
    has = l > 0
    o = jnp.where(has[:, None], o / jnp.where(has, l, 1.0)[:, None], 0.0)
    plgpu.store(o_ref.at[rows, heads, d], o.astype(o_ref.dtype), mask=rmask)


def paged_prefill_attention(q, k_pool, v_pool, layer, page_table, cu_q_lens, kv_lens, *,
                            max_q_len, scale, block_q: int = 128, block_k: int = 128,
                            num_warps: int = 8, num_stages: int = 3, poison: bool = False):
    """Ragged chunks. q [T, H, Dh] -> [T, H, Dh]. (The engine's ``pallas`` backend takes
    the Mosaic GPU kernel instead on a GPU where it applies: kernels.attention.)"""
    T, H, D = q.shape
    KV = k_pool.shape[3]
    if not supported(D):
        return ref.paged_prefill_attention(q, k_pool, v_pool, layer, page_table, cu_q_lens, kv_lens,
                                           max_q_len=max_q_len, scale=scale)
    B = page_table.shape[0]
    G = H // KV
    Gp = _pow2(G)
    if jnp.dtype(q.dtype).itemsize >= 4:  # float32 tiles are twice the bytes: fit in shared memory
        block_q, block_k, num_stages = min(block_q, 64), min(block_k, 64), min(num_stages, 2)
    # block_q rows of the tile hold block_q // Gp tokens x Gp heads; short chunks get fewer tokens
    block_t = max(1, min(block_q // Gp, _pow2(max_q_len)))
    block_t = max(block_t, -(-_MIN_ROWS // Gp))
    NB = -(-T // block_t) + B  # every sequence may leave one partial block
    cu = cu_q_lens.astype(jnp.int32)
    bseq, bstart = prefill_blocks(cu, NB, block_t)
    kernel = functools.partial(_prefill_kernel, G=G, Gp=Gp, block_t=block_t, block_k=block_k,
                               scale=float(scale))
    out = _call(
        kernel,
        (_scalar(layer), page_table.astype(jnp.int32), kv_lens.astype(jnp.int32), cu, bseq, bstart,
         q, k_pool, v_pool),
        jax.ShapeDtypeStruct((T, H, D), q.dtype),
        grid=(NB, KV), name=f"paged_prefill_bt{block_t}_g{Gp}_bk{block_k}",
        params=_params(num_warps, num_stages), poison=poison)
    # Padding tokens (past the last sequence) belong to no block: zeros, like the reference.
    return jnp.where((jnp.arange(T) < cu[-1])[:, None, None], out, jnp.zeros((), q.dtype))


# ------------------------------------------------------------------------ KV movement

def _write_kernel(layer_ref, slot_ref, k_ref, v_ref, kp_in, vp_in, kp_ref, vp_ref, *, block_t: int,
                  width: int):
    del kp_in, vp_in  # aliased to kp_ref / vp_ref
    i = pl.program_id(0)
    T = k_ref.shape[0]
    S = kp_ref.shape[2]
    t = i * block_t + jnp.arange(block_t)
    c = jnp.arange(_pow2(width))[None, :]
    mask = (t[:, None] < T) & (c < width)
    slots = plgpu.load(slot_ref.at[t], mask=t < T, other=0)[:, None]
    layer = layer_ref[0]
    for src, dst in ((k_ref, kp_ref), (v_ref, vp_ref)):
        x = plgpu.load(src.at[t[:, None], c], mask=mask, other=0)
        plgpu.store(dst.at[slots // S, layer, slots % S, c], x.astype(dst.dtype), mask=mask)


def write_kv(k_pool, v_pool, layer, k, v, slot_mapping, *, block_t: int = 16):
    """Scatter this step's K/V [T, KV, Dh] into flat slots (page * S + offset), in place."""
    P, L, S, KV, D = k_pool.shape
    T = k.shape[0]
    W = KV * D
    rows = lambda x: x.reshape(P, L, S, W)  # noqa: E731 -- a free bitcast of the pool
    kernel = functools.partial(_write_kernel, block_t=block_t, width=W)
    kp, vp = _call(
        kernel,
        (_scalar(layer), slot_mapping.astype(jnp.int32), k.reshape(T, W), v.reshape(T, W),
         rows(k_pool), rows(v_pool)),
        [jax.ShapeDtypeStruct((P, L, S, W), k_pool.dtype)] * 2,
        grid=(-(-T // block_t),), name="write_kv", params=_params(4, 1), aliases={4: 0, 5: 1})
    return kp.reshape(k_pool.shape), vp.reshape(v_pool.shape)


def _chunk(E: int, max_chunk: int = 4096) -> int:
    return min(_pow2(E), max_chunk)


def _gather_kernel(ids_ref, pool_ref, out_ref, *, chunk: int):
    i, c = pl.program_id(0), pl.program_id(1)
    E = pool_ref.shape[-1]
    e = c * chunk + jnp.arange(chunk)
    x = plgpu.load(pool_ref.at[ids_ref[i], e], mask=e < E, other=0)
    plgpu.store(out_ref.at[i, e], x, mask=e < E)


def gather_pages(pool, page_ids, *, poison: bool = False):
    """Copy pages (every layer) into a contiguous buffer: [P, L, ...] -> [n, L, ...]. A page
    is one contiguous piece of the page-major pool, so each program copies a chunk of one."""
    P = pool.shape[0]
    E = math.prod(pool.shape[1:])
    n = page_ids.shape[0]
    ch = _chunk(E)
    out = _call(functools.partial(_gather_kernel, chunk=ch), (page_ids.astype(jnp.int32), pool.reshape(P, E)),
                jax.ShapeDtypeStruct((n, E), pool.dtype), grid=(n, -(-E // ch)), name="gather_pages",
                params=_params(4, 1), poison=poison)
    return out.reshape(n, *pool.shape[1:])


def _scatter_kernel(ids_ref, staged_ref, pool_in, pool_ref, *, chunk: int):
    del pool_in  # aliased to pool_ref
    i, c = pl.program_id(0), pl.program_id(1)
    E = pool_ref.shape[-1]
    e = c * chunk + jnp.arange(chunk)
    x = plgpu.load(staged_ref.at[i, e], mask=e < E, other=0)
    plgpu.store(pool_ref.at[ids_ref[i], e], x.astype(pool_ref.dtype), mask=e < E)


def scatter_pages(pool, page_ids, staged):
    """Inverse of gather_pages: write staged [n, L, ...] into pool pages, in place (donate the pool)."""
    P = pool.shape[0]
    E = math.prod(pool.shape[1:])
    n = page_ids.shape[0]
    ch = _chunk(E)
    out = _call(functools.partial(_scatter_kernel, chunk=ch),
                (page_ids.astype(jnp.int32), staged.reshape(n, E), pool.reshape(P, E)),
                jax.ShapeDtypeStruct((P, E), pool.dtype), grid=(n, -(-E // ch)), name="scatter_pages",
                params=_params(4, 1), aliases={2: 0})
    return out.reshape(pool.shape)
