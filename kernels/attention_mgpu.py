"""Chunked prefill attention over pages in Mosaic GPU (Hopper).

The engine's prefill kernel on a GPU for 16-bit dtypes and head dims 64/128 (see
``kernels.attention_pallas.paged_prefill_attention``; float32 and other shapes take the
Triton-lowered kernel). Why Mosaic GPU: kernels/NOTES.md ("Prefill: is a Mosaic GPU
kernel the way ..."): 1.0x cuDNN from pages vs 0.55x for the Triton lowering.

Ragged queries are cut into tiles of 2 * block_q tokens that never cross a sequence
(``prefill_blocks``); the wrapper scatters q into a tile-padded buffer, so every program
reads and writes whole tiles by TMA, and gathers the outputs back. One program = one q
head x one tile: two consumer warpgroups (block_q rows each) compute QK^T and PV with
wgmma from swizzled SMEM, online softmax in base 2; a producer warpgroup fills a ring of
``steps`` K/V slots by TMA, one copy per page ([page_size, D] box), all the copies of a
slot counted on that slot's barrier. A chunk that follows a prefix attends to it
(positions offset by kv_len - q_len). Pools: [L, P, S, KV, D]; q: [T, H, D].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def supported(dtype, head_dim: int, page_size: int, block_kv: int = 128) -> bool:
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim in (64, 128)
            and page_size % 8 == 0 and block_kv % page_size == 0)


def _tile_kernel(q_ref, k_ref, v_ref, lay_ref, pt_ref, bseq_ref, bstart_ref, qlen_ref, kvlen_ref, out_ref,
                 scoped, *, block_q, block_kv, steps, npb, S, G, D, dtype, qk_scale):
    (qo_smem2, k_smem, v_smem), (k_bar, v_bar, q_bar), (k_free, v_free), sched = scoped
    b = lax.axis_index("tiles")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    seq = bseq_ref[b]
    t0 = bstart_ref[b]  # first token of the tile within its sequence's chunk
    q_len = qlen_ref[seq]
    prefix = kvlen_ref[seq] - q_len
    bkv = jnp.array(block_kv, jnp.int32)
    tile_kv_steps = pl.cdiv(prefix + jnp.minimum(t0 + 2 * block_q, q_len), bkv)

    def sched_barrier():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when((t0 < q_len) & (wg < 2))
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        qo_smem = qo_smem2.at[wg]
        local = t0 + wg * block_q  # this warpgroup's first row, within the chunk
        kv_steps = pl.cdiv(prefix + jnp.minimum(local + block_q, q_len), bkv)
        full = jnp.minimum(lax.div(prefix + local + 1, bkv), kv_steps)  # steps needing no mask
        row0 = b * (2 * block_q) + wg * block_q
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, block_q), head], qo_smem, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((block_q, D), 0, jnp.float32), plgpu.Layout.WGMMA)
        plgpu.barrier_wait(k_bar.at[0])
        pl.when(wg == 1)(sched_barrier)

        def step(kv_step, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))

            def qk_scope(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                sched_barrier()
                return acc_ref[...]
            s = pl.run_scoped(qk_scope, plgpu.ACC((block_q, block_kv), jnp.float32)) * qk_scale
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:  # causal, positions offset by the prefix
                rows = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0, layout=plgpu.Layout.WGMMA)
                cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA)
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

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                nxt = kv_step + 1

                @pl.when(nxt < kv_steps)
                def _():
                    plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.array(steps, nxt.dtype))])
            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        def drain(kv_step, _):  # blocks only the other warpgroup needs: release our claim
            slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            sched_barrier()
            sched_barrier()

        carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(full, kv_steps, functools.partial(step, masked=True), carry)
        lax.fori_loop(kv_steps, tile_kv_steps, drain, None)
        pl.when(wg == 0)(sched_barrier)
        acc = acc / lax.broadcast_in_dim(l_i, (block_q, D), [0])
        qo_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[pl.ds(row0, block_q), head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when((t0 < q_len) & (wg == 2))
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.array(G, head.dtype))
        layer = lay_ref[0]

        def load(kv_step, slot):
            for j in range(npb):  # one TMA copy per page; the slot's barrier counts them
                page = pt_ref[seq, kv_step * npb + j]
                rows = pl.ds(j * S, S)
                plgpu.copy_gmem_to_smem(k_ref.at[layer, page, :, kv_head], k_smem.at[slot, rows], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[layer, page, :, kv_head], v_smem.at[slot, rows], v_bar.at[slot])

        for i in range(steps):
            pl.when(i < tile_kv_steps)(functools.partial(load, jnp.int32(i), i))

        @pl.loop(0, tile_kv_steps - steps)
        def _(kv_step):
            slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            load(kv_step + steps, slot)


def paged_prefill_attention(q, k_pool, v_pool, layer, page_table, cu_q_lens, kv_lens, *, scale,
                            block_q: int = 64, block_kv: int = 128, steps: int = 2):
    """Ragged chunks: q [T, H, D] (chunk of sequence i = rows cu_q_lens[i]:cu_q_lens[i+1],
    its KV length kv_lens[i] including the chunk) -> [T, H, D]. Rows past cu_q_lens[-1]
    are padding: zeros."""
    from kernels.attention_pallas import blocks_before, prefill_blocks

    T, H, D = q.shape
    S, KV = k_pool.shape[2], k_pool.shape[3]
    B = page_table.shape[0]
    G, BT, npb = H // KV, 2 * block_q, block_kv // S
    assert supported(q.dtype, D, S, block_kv), (q.dtype, D, S)
    NB = -(-T // BT) + B  # every sequence may leave one partial tile
    cu = cu_q_lens.astype(jnp.int32)
    q_lens = cu[1:] - cu[:-1]
    bseq, bstart = prefill_blocks(cu, NB, BT)
    bstart = bstart - cu[bseq]  # within the chunk; >= q_len for unused tiles
    # Tile-padded q (tile b holds rows b*BT .. b*BT + BT - 1), built by a gather: XLA's
    # scatter of the same rows took longer than the attention itself.
    r = jnp.arange(NB * BT, dtype=jnp.int32)
    r_seq, r_loc = bseq[r // BT], bstart[r // BT] + r % BT
    # (rows past a chunk hold other tokens' q: junk rows of the tile, never written back;
    # a TMA load at a dynamic row of q itself fails Mosaic GPU's layout inference in JAX 0.11.2)
    q_pad = q[jnp.minimum(cu[r_seq] + r_loc, T - 1)]
    # ... and each token's row in it, to gather the outputs back
    tok = jnp.arange(T, dtype=jnp.int32)
    s_t = jnp.clip(jnp.searchsorted(cu, tok, side="right").astype(jnp.int32) - 1, 0, B - 1)
    cum = blocks_before(cu, BT)
    loc = tok - cu[s_t]
    valid = tok < cu[-1]
    prow = jnp.where(valid, (cum[s_t] + loc // BT) * BT + loc % BT, 0)
    cols = -(-page_table.shape[1] // npb) * npb  # whole K/V blocks of page ids
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, cols - page_table.shape[1])))
    lay = jnp.asarray(layer, jnp.int32).reshape(1)
    kern = functools.partial(_tile_kernel, block_q=block_q, block_kv=block_kv, steps=steps, npb=npb, S=S,
                             G=G, D=D, dtype=q.dtype, qk_scale=scale * math.log2(math.e))

    def entry(*refs):
        tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *a: kern(*refs, a),
            (plgpu.SMEM((2, block_q, D), q.dtype, transforms=tf),
             plgpu.SMEM((steps, block_kv, D), q.dtype, transforms=tf),
             plgpu.SMEM((steps, block_kv, D), q.dtype, transforms=tf)),
            (plgpu.Barrier(num_arrivals=npb, num_barriers=steps),
             plgpu.Barrier(num_arrivals=npb, num_barriers=steps),
             plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=steps),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg")

    out_pad = plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct(q_pad.shape, q.dtype),
                           grid=(H, NB), grid_names=("heads", "tiles"), num_threads=3, thread_name="wg",
                           compiler_params=plgpu.CompilerParams(approx_math=True))(
        q_pad, k_pool, v_pool, lay, pt, bseq, bstart, q_lens, kv_lens.astype(jnp.int32))
    return jnp.where(valid[:, None, None], out_pad[prow], 0).astype(q.dtype)
