"""Prefill attention over pages in Mosaic GPU (Hopper): a prototype, not yet used by the engine.

One sequence whose whole context is its own chunk (no prefix yet), T a multiple of
2 * block_q; see kernels/NOTES.md ("Prefill: is a Mosaic GPU kernel the way ...") for
why and for what remains (ragged batches, prefixes). Layout per program (one q head,
2 * block_q rows): two consumer warpgroups of block_q rows each compute
QK^T and PV with wgmma from swizzled SMEM; a producer warpgroup fills a ring of
`steps` K/V slots by TMA, one copy per page ([page_size, D] box), all the copies of a
slot counted on that slot's barrier. Pools: [L, P, S, KV, D]; q: [T, H, D].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


@functools.partial(jax.jit, static_argnames=("layer", "scale", "block_q", "block_kv", "steps"))
def paged_prefill_one(q, k_pool, v_pool, page_table, *, layer: int, scale: float, block_q: int = 64,
                      block_kv: int = 128, steps: int = 2):
    """q [T, H, D], page_table [>= T / S] int32 -> [T, H, D], causal over the sequence itself."""
    T, H, D = q.shape
    S, KV = k_pool.shape[2], k_pool.shape[3]
    G = H // KV
    dtype = q.dtype
    npb = block_kv // S  # pages per K/V block
    assert block_kv % S == 0 and S % 8 == 0 and T % (2 * block_q) == 0 and T % block_kv == 0
    qk_scale = scale * math.log2(math.e)  # softmax in base 2

    def kernel(q_ref, k_ref, v_ref, pt_ref, out_ref, scoped):
        (qo_smem2, k_smem, v_smem), (k_bar, v_bar, q_bar), (k_free, v_free), sched = scoped
        head = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        tile_end = (lax.axis_index("q_seq") + 1) * (2 * block_q)
        tile_kv_steps = pl.cdiv(tile_end, jnp.array(block_kv, jnp.int32))

        def sched_barrier():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            q_base = lax.axis_index("q_seq") * (2 * block_q) + wg * block_q
            kv_steps = pl.cdiv(q_base + block_q, jnp.array(block_kv, jnp.int32))
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_base, block_q), head], qo_smem, q_bar.at[wg])
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
                if masked:
                    rows = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(rows + q_base >= cols + kv_step * block_kv, s, -jnp.inf)
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

            def drain(kv_step, _):  # blocks the other warpgroup still needs: release our claim
                slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                sched_barrier()
                sched_barrier()

            full = lax.div(q_base, jnp.array(block_kv, jnp.int32))
            carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m_i, l_i))
            acc, m_i, l_i = lax.fori_loop(full, kv_steps, functools.partial(step, masked=True), carry)
            lax.fori_loop(kv_steps, tile_kv_steps, drain, None)
            pl.when(wg == 0)(sched_barrier)
            acc = acc / lax.broadcast_in_dim(l_i, (block_q, D), [0])
            qo_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[pl.ds(q_base, block_q), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.array(G, head.dtype))

            def load(kv_step, slot):
                for j in range(npb):  # one TMA copy per page; the slot's barrier counts them
                    page = pt_ref[kv_step * npb + j]
                    rows = pl.ds(j * S, S)
                    plgpu.copy_gmem_to_smem(k_ref.at[layer, page, :, kv_head], k_smem.at[slot, rows],
                                            k_bar.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[layer, page, :, kv_head], v_smem.at[slot, rows],
                                            v_bar.at[slot])

            for i in range(steps):
                load(jnp.int32(i), i)

            @pl.loop(0, tile_kv_steps - steps)
            def _(kv_step):
                slot = lax.rem(kv_step, jnp.array(steps, kv_step.dtype))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                load(kv_step + steps, slot)

    def entry(q_ref, k_ref, v_ref, pt_ref, out_ref):
        tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (plgpu.SMEM((2, block_q, D), dtype, transforms=tf),
                plgpu.SMEM((steps, block_kv, D), dtype, transforms=tf),
                plgpu.SMEM((steps, block_kv, D), dtype, transforms=tf))
        pl.run_scoped(
            lambda *a: kernel(q_ref, k_ref, v_ref, pt_ref, out_ref, a),
            smem,
            (plgpu.Barrier(num_arrivals=npb, num_barriers=steps),
             plgpu.Barrier(num_arrivals=npb, num_barriers=steps),
             plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=steps),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg")

    return plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct(q.shape, dtype),
                        grid=(H, T // (2 * block_q)), grid_names=("heads", "q_seq"),
                        num_threads=3, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(approx_math=True))(q, k_pool, v_pool, page_table)
