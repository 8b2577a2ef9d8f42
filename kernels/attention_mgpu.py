"""Chunked prefill attention over pages in Mosaic GPU (Hopper).

The engine's prefill kernel on a GPU for 16-bit dtypes and head dims 64/128 (the choice
is made in ``kernels.attention.paged_prefill_attention``; float32 and other shapes take
the Triton-lowered kernel of ``attention_pallas``). Why Mosaic GPU: kernels/NOTES.md
("Prefill: is a Mosaic GPU kernel the way ..."): 1.0x cuDNN from pages vs 0.55x for the
Triton lowering.

Ragged queries are read and the output written in place: a program's tile is an aligned
block of 2 * block_q rows of q (TMA loads at multiples of block_q), one program per
(chunk, block it touches) and q head; a block shared by two chunks is computed once for
each, and each stores only its own rows (``_store_rows``: TMA stores of power-of-two row
counts from an untiled SMEM buffer); the tile table is ``tiling.aligned_tiles``. The
padding rows past the last chunk are one more segment whose tiles store zeros. Two
consumer warpgroups (block_q rows each) compute QK^T and PV with wgmma from swizzled
SMEM, online softmax in base 2; a producer warpgroup fills a ring of ``steps`` K/V slots
by TMA, one copy per page ([page_size, D] box), all the copies of a slot counted on that
slot's barrier. A chunk that follows a prefix attends to it
(positions offset by kv_len - q_len). Pools: [P, L, S, KV, D] (page-major); q: [T, H, D].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.tiling import aligned_tiles


def _interpret_params():
    """Mosaic GPU's CPU interpreter (simulated SMEM, TMA, barriers, warpgroups) off a GPU:
    what lets the CPU suite run this kernel's code; None on a GPU."""
    if jax.devices()[0].platform == "gpu":
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public name in JAX 0.10

    return InterpretGPUParams()


def supported(dtype, head_dim: int, page_size: int, block_kv: int = 128) -> bool:
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim in (64, 128)
            and page_size % 8 == 0 and block_kv % page_size == 0)


def _cast(x, layout, interpret: bool):  # (the CPU interpreter has no layouts)
    return x if interpret else plgpu.layout_cast(x, layout)


def _iota(shape, dim, interpret: bool):
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _store_rows(o_smem, out_ref, head, row0, lo, hi, block_q: int):
    """TMA-store rows lo..hi-1 of o_smem to out rows row0+lo.. (a TMA box has a static
    size: one store per set bit of hi - lo, largest first)."""
    n = hi - lo
    start, size = lo, block_q
    while size:
        @pl.when((n & size) != 0)
        def _(start=start, size=size):
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, size)], out_ref.at[pl.ds(row0 + start, size), head])
        start = start + (n & size)
        size //= 2


def _tile_kernel(q_ref, k_ref, v_ref, lay_ref, pt_ref, cu_ref, tseq_ref, tblk_ref, kvlen_ref, out_ref,
                 scoped, *, block_q, block_kv, steps, npb, S, G, D, B, dtype, qk_scale, interpret):
    (q_smem2, o_smem2, k_smem, v_smem), (k_bar, v_bar, q_bar), (k_free, v_free), sched = scoped
    b = lax.axis_index("tiles")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    seq = tseq_ref[b]  # == B: the padding rows past the last chunk (zeros)
    blk = tblk_ref[b]
    BT = 2 * block_q
    tile0 = blk * BT  # the tile's first row of q (tiles are aligned; a chunk may start mid-tile)
    cs, ce = cu_ref[seq], cu_ref[seq + 1]
    q_len = ce - cs
    active = (blk >= 0) & (tile0 < ce) & (tile0 + BT > cs)
    is_pad = seq == B
    prefix = kvlen_ref[seq] - q_len
    bkv = jnp.array(block_kv, jnp.int32)
    tile_kv_steps = pl.cdiv(prefix + jnp.minimum(tile0 + BT - cs, q_len), bkv)
    row0 = tile0 + wg * block_q  # this warpgroup's first row of q
    lo, hi = jnp.clip(cs - row0, 0, block_q), jnp.clip(ce - row0, 0, block_q)  # its rows of the chunk

    def sched_barrier():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(active & is_pad & (wg < 2))
    def _zeros():
        o_smem = o_smem2.at[wg]
        o_smem[...] = _cast(jnp.full((block_q, D), 0, dtype), plgpu.Layout.WGMMA, interpret)
        plgpu.commit_smem()
        _store_rows(o_smem, out_ref, head, row0, lo, hi, block_q)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(active & ~is_pad & (wg < 2))
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
        local = row0 - cs  # chunk position of the first row (< 0: rows of an earlier chunk)
        kv_steps = jnp.maximum(pl.cdiv(prefix + jnp.minimum(local + block_q, q_len), bkv), 0)
        full = jnp.clip(lax.div(prefix + local + lo + 1, bkv), 0, kv_steps)  # steps needing no mask
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, block_q), head], q_smem, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        m_i = _cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret)
        l_i = _cast(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret)
        acc = _cast(jnp.full((block_q, D), 0, jnp.float32), plgpu.Layout.WGMMA, interpret)
        pl.when(kv_steps > 0)(lambda: plgpu.barrier_wait(k_bar.at[0]))
        pl.when(wg == 1)(sched_barrier)

        def step(kv_step, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))

            def qk_scope(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                sched_barrier()
                return acc_ref[...]
            if interpret:  # the CPU interpreter: the same product by jnp (no wgmma of a transposed ref)
                s = jnp.dot(q_smem[...], k_smem[slot].T, preferred_element_type=jnp.float32)
                sched_barrier()
            else:
                s = pl.run_scoped(qk_scope, plgpu.ACC((block_q, block_kv), jnp.float32))
            s = s * qk_scale
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:  # causal, positions offset by the prefix
                rows, cols = (_iota((block_q, block_kv), d, interpret) for d in (0, 1))
                s = jnp.where(rows + (prefix + local) >= cols + kv_step * block_kv, s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_wait(sched)

            def wait_next_k():
                nxt = kv_step + 1

                @pl.when(nxt < kv_steps)
                def _():
                    plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.array(steps, nxt.dtype))])

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                wait_next_k()
            if interpret:  # (no run_state in the CPU interpreter)
                acc = acc + jnp.dot(p16, v_smem[slot], preferred_element_type=jnp.float32)
                wait_next_k()
            else:
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        def drain(kv_step, _):  # blocks only the other warpgroup needs: release our claim
            slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
            # (every phase of a barrier observed by each warpgroup that waits on it: the
            # interpreter checks that; on the GPU these loads are the other group's anyway)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            sched_barrier()
            sched_barrier()

        carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(full, kv_steps, functools.partial(step, masked=True), carry)
        lax.fori_loop(kv_steps, tile_kv_steps, drain, None)
        pl.when(wg == 0)(sched_barrier)
        acc = acc / lax.broadcast_in_dim(l_i, (block_q, D), [0])
        o_smem[...] = acc.astype(dtype)  # (rows outside lo..hi: other chunks' rows, never stored)
        plgpu.commit_smem()
        _store_rows(o_smem, out_ref, head, row0, lo, hi, block_q)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(active & ~is_pad & (wg == 2))
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(G, head.dtype))
        layer = lay_ref[0]

        def load(kv_step, slot):
            for j in range(npb):  # one TMA copy per page; the slot's barrier counts them
                page = pt_ref[seq, kv_step * npb + j]
                rows = pl.ds(j * S, S)
                plgpu.copy_gmem_to_smem(k_ref.at[page, layer, :, kv_head], k_smem.at[slot, rows], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[page, layer, :, kv_head], v_smem.at[slot, rows], v_bar.at[slot])

        for i in range(steps):
            pl.when(i < tile_kv_steps)(functools.partial(load, jnp.int32(i), i))

        @pl.loop(0, tile_kv_steps - steps)
        def _(kv_step):
            slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            load(kv_step + steps, slot)

        @pl.loop(jnp.maximum(tile_kv_steps - steps, 0), tile_kv_steps)
        def _(kv_step):  # the last use of each slot (observed, like every other phase)
            slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def paged_prefill_attention(q, k_pool, v_pool, layer, page_table, cu_q_lens, kv_lens, *, scale,
                            block_q: int = 64, block_kv: int = 128, steps: int = 2, poison: bool = False):
    """Ragged chunks: q [T, H, D] (chunk of sequence i = rows cu_q_lens[i]:cu_q_lens[i+1],
    its KV length kv_lens[i] including the chunk) -> [T, H, D]. Rows past cu_q_lens[-1]
    are padding: zeros. q is read and the output written in place: tiles are aligned
    blocks of 2 * block_q rows, a block shared by two chunks is computed once for each,
    and each stores only its own rows. poison: the output starts as NaN (tests: a row no
    tile writes shows)."""
    T, H, D = q.shape
    S, KV = k_pool.shape[2], k_pool.shape[3]
    B = page_table.shape[0]
    G, BT, npb = H // KV, 2 * block_q, block_kv // S
    assert supported(q.dtype, D, S, block_kv) and block_q & (block_q - 1) == 0, (q.dtype, D, S, block_q)
    Tp = -(-T // BT) * BT  # whole tiles of q to read (static: no copy when T is a multiple)
    q_in = q if Tp == T else jnp.pad(q, ((0, Tp - T), (0, 0), (0, 0)))
    NB = Tp // BT + B  # each of the B chunk ends may share a block with what follows
    cu = jnp.concatenate([cu_q_lens.astype(jnp.int32), jnp.full((1,), T, jnp.int32)])
    tseq, tblk = aligned_tiles(cu, NB, BT)
    kvl = jnp.concatenate([kv_lens.astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
    cols = -(-page_table.shape[1] // npb) * npb  # whole K/V blocks of page ids
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, cols - page_table.shape[1])))
    lay = jnp.asarray(layer, jnp.int32).reshape(1)
    interp = _interpret_params()
    kern = functools.partial(_tile_kernel, block_q=block_q, block_kv=block_kv, steps=steps, npb=npb, S=S,
                             G=G, D=D, B=B, dtype=q.dtype, qk_scale=scale * math.log2(math.e),
                             interpret=interp is not None)

    def entry(*refs):
        tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *a: kern(*refs, a),
            (plgpu.SMEM((2, block_q, D), q.dtype, transforms=tf),
             plgpu.SMEM((2, block_q, D), q.dtype),  # untiled: row-granular output stores
             plgpu.SMEM((steps, block_kv, D), q.dtype, transforms=tf),
             plgpu.SMEM((steps, block_kv, D), q.dtype, transforms=tf)),
            (plgpu.Barrier(num_arrivals=npb, num_barriers=steps),
             plgpu.Barrier(num_arrivals=npb, num_barriers=steps),
             plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=steps),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg")

    args = (q_in, k_pool, v_pool, lay, pt, cu, tseq, tblk, kvl)
    mesh = dict(grid=(H, NB), grid_names=("heads", "tiles"), num_threads=3, thread_name="wg",
                compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interp)
    if poison and interp is None:  # the output as a mutable ref the kernel writes into (the
        # interpreter starts every buffer as NaN by itself)
        out = jax.new_ref(jnp.full((Tp, H, D), jnp.nan, q.dtype))
        plgpu.kernel(entry, out_type=(), **mesh)(*args, out)
        out = out[...]
    else:
        out = plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct((Tp, H, D), q.dtype), **mesh)(*args)
    return out if Tp == T else out[:T]
