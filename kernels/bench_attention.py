"""Attention benchmark on the GPU: our implementations against the ceilings and baselines,
all measured in the same run (kernels issue). Prints a table last.

    python3 -m kernels.bench_attention            # on the device machine
    python3 -m kernels.bench_attention --quick    # CPU smoke run (tiny shapes)

Ceilings: a large device-to-device copy (bytes read + written per second) and a large
bf16 matmul. Decode rows count the K/V bytes each kernel must read (every sequence's
context, K and V, once); prefill rows count causal FLOPs (4 * T^2/2 * H * D per sequence).
Baselines: JAX's deprecated Pallas paged_attention (decode) and
jax.nn.dot_product_attention(implementation="cudnn") on contiguous data (prefill), and
JAX's Mosaic GPU attention_mgpu on contiguous data (what a TMA/wgmma kernel reaches here).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import attention_pallas as pk
from kernels import attention_ref as ref

PREFILL_KW: dict = {}  # tile choice for our prefill kernel (set from the sweep with --prefill-tiles)


def bench(fn, *args, warmup=3, iters=20, reps=5) -> float:
    """Seconds per call of fn(*args): calls issued back to back (no host sync between them,
    as in a serving loop), synchronised once per repetition; the median repetition."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = [fn(*args) for _ in range(iters)]
        jax.block_until_ready(out[-1])  # one stream: the last call ends last (earlier may be donated)
        times.append((time.perf_counter() - t0) / iters)
        del out
    return float(np.median(times))


def copy_ceilings(nbytes: int, torch_copy: bool = True) -> list[tuple[str, float, float]]:
    """(name, seconds, bytes/s counting read + write) of a large device-to-device copy:
    an XLA copy and, on a GPU where torch is present, torch's ``copy_``. The bandwidth
    ceiling of every benchmark is the best of them."""
    out = []
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    t = bench(jax.jit(lambda a: a * jnp.bfloat16(1.0001)), x, iters=10)
    out.append(("device copy, XLA (read+write)", t, 2 * nbytes / t))
    del x
    if torch_copy and jax.devices()[0].platform == "gpu":
        try:
            import torch

            a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
            b = torch.empty_like(a)
            for _ in range(3):
                b.copy_(a)
            torch.cuda.synchronize()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(10):
                    b.copy_(a)
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) / 10)
            t = float(np.median(ts))
            out.append(("device copy, torch (read+write)", t, 2 * nbytes / t))
            del a, b
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 -- torch is optional
            print(f"torch copy skipped: {e}")
    return out


def ceilings(quick: bool) -> tuple[list, float, float]:
    """Copy ceiling (best of copy_ceilings) and the bf16 matmul ceiling, as table rows."""
    copies = copy_ceilings((1 << 20) if quick else (1 << 31), torch_copy=not quick)
    bw = max(b for _, _, b in copies)
    rows = [("ceiling", name, t, b / 1e12, b / bw) for name, t, b in copies]
    m = 512 if quick else 8192
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    t = bench(jax.jit(lambda p, q: p @ q), a, b)
    fl = 2 * m ** 3 / t
    rows.append(("ceiling", "bf16 matmul", t, fl / 1e12, 1.0))
    return rows, bw, fl


def rel_err(got, want) -> float:
    got, want = (jnp.asarray(x, jnp.float32) for x in (got, want))
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def decode_case(B, ctx, H=32, KV=8, D=128, S=16, dtype=jnp.bfloat16, seed=0):
    """Random pool and non-contiguous random page tables; our layout [L=1, P, S, KV, D]."""
    rng = np.random.default_rng(seed)
    ppseq = -(-ctx // S)
    P = B * ppseq + 1
    pages = rng.permutation(np.arange(1, P))[:B * ppseq].reshape(B, ppseq).astype(np.int32)
    k = jax.random.normal(jax.random.key(seed), (1, P, S, KV, D), dtype)
    v = jax.random.normal(jax.random.key(seed + 1), (1, P, S, KV, D), dtype)
    q = jax.random.normal(jax.random.key(seed + 2), (B, H, D), dtype)
    lens = jnp.full((B,), ctx, jnp.int32)
    return q, k, v, jnp.asarray(pages), lens


def run_decode(rows, bw, B, ctx, quick):
    q, k, v, pt, lens = decode_case(B, ctx, H=8 if quick else 32, KV=2 if quick else 8, D=64 if quick else 128)
    D = q.shape[-1]
    kv_bytes = 2 * B * ctx * k.shape[3] * D * k.dtype.itemsize
    refj = jax.jit(lambda q, k, v, pt, l: ref.paged_decode_attention(q, k, v, 0, pt, l, scale=D ** -0.5))
    out_ref = refj(q, k, v, pt, lens)
    t = bench(refj, q, k, v, pt, lens)
    rows.append((f"decode B={B} ctx={ctx}", "jnp reference", t, kv_bytes / t / 1e12, kv_bytes / t / bw))
    ours = jax.jit(lambda q, k, v, pt, l: pk.paged_decode_attention(q, k, v, 0, pt, l, scale=D ** -0.5))
    err = rel_err(ours(q, k, v, pt, lens), out_ref)
    t = bench(ours, q, k, v, pt, lens)
    rows.append((f"decode B={B} ctx={ctx}", f"ours, Pallas (err {err:.1e})", t, kv_bytes / t / 1e12,
                 kv_bytes / t / bw))
    if jax.devices()[0].platform != "gpu":
        return
    try:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        kp, vp = (jnp.transpose(x[0], (2, 0, 1, 3)) for x in (k, v))  # [KV, P, S, D]
        # that kernel does not scale the logits: pass q pre-scaled by 1/sqrt(D)
        pa = jax.jit(lambda q, kp, vp, pt, l: paged_attention(q * jnp.asarray(D ** -0.5, q.dtype), kp, vp, pt, l))
        got = pa(q, kp, vp, pt, lens)
        err = rel_err(got, out_ref)
        t = bench(pa, q, kp, vp, pt, lens)
        rows.append((f"decode B={B} ctx={ctx}", f"pallas paged_attention (err {err:.1e})", t,
                     kv_bytes / t / 1e12, kv_bytes / t / bw))
    except Exception as e:  # noqa: BLE001 -- a baseline that fails is reported, not fatal
        rows.append((f"decode B={B} ctx={ctx}", f"pallas paged_attention FAILED {type(e).__name__}", 0, 0, 0))


def run_prefill(rows, flops_ceiling, T, quick):
    H, KV, D, S = (8, 2, 64, 16) if quick else (32, 8, 128, 16)
    q = jax.random.normal(jax.random.key(3), (T, H, D), jnp.bfloat16)
    kc = jax.random.normal(jax.random.key(4), (T, KV, D), jnp.bfloat16)
    vc = jax.random.normal(jax.random.key(5), (T, KV, D), jnp.bfloat16)
    P = T // S
    perm = np.random.default_rng(0).permutation(np.arange(1, P + 1)).astype(np.int32)
    pool = lambda x: jnp.zeros((1, P + 1, S, KV, D), x.dtype).at[0, perm].set(x.reshape(P, S, KV, D))  # noqa: E731
    kp, vp = pool(kc), pool(vc)
    flops = 4 * T * T / 2 * H * D
    paged = (jnp.asarray(perm)[None], jnp.asarray([0, T], jnp.int32), jnp.asarray([T], jnp.int32))
    ours = jax.jit(lambda q, k, v: ref.paged_prefill_attention(q, k, v, 0, *paged, max_q_len=T, scale=D ** -0.5))
    out_ref = ours(q, kp, vp)
    t = bench(ours, q, kp, vp, iters=5)
    rows.append((f"prefill T={T}", "jnp reference (pages)", t, flops / t / 1e12, flops / t / flops_ceiling))
    ours_prefill_rows(rows, f"prefill T={T}", (q, kp, vp, *paged), T, out_ref, flops, flops_ceiling)
    if jax.devices()[0].platform != "gpu":
        return
    try:
        rep = H // KV
        cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q[None], jnp.repeat(k, rep, 1)[None], jnp.repeat(v, rep, 1)[None], is_causal=True,
            implementation="cudnn"))
        t = bench(cud, q, kc, vc, iters=10)
        rows.append((f"prefill T={T}", "cuDNN (contiguous data)", t, flops / t / 1e12, flops / t / flops_ceiling))
    except Exception as e:  # noqa: BLE001
        rows.append((f"prefill T={T}", f"cuDNN FAILED {type(e).__name__}", 0, 0, 0))
    # JAX's own Hopper kernel (Mosaic GPU: TMA, wgmma, two compute warpgroups), contiguous
    # data: how close a Mosaic GPU kernel gets to cuDNN here, before writing a paged one.
    # (float16: its bfloat16 path fails in JAX 0.11.2, "src bfloat16, dst float16"; the
    # tensor cores run both at the same rate.)
    # It applies no softmax scale: q goes in pre-scaled.
    q16, k16, v16 = (x.astype(jnp.float16) for x in (q * D ** -0.5, kc, vc))
    for bq, bkv in ((64, 128), (64, 64)):
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as am

            cfg = am.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=2, causal=True)
            mg = jax.jit(lambda q, k, v, cfg=cfg: am.attention(q[None], k[None], v[None], cfg)[0])
            err = rel_err(mg(q16, k16, v16), out_ref)
            t = bench(mg, q16, k16, v16, iters=10)
            rows.append((f"prefill T={T}", f"JAX attention_mgpu {bq}x{bkv} f16 (contiguous, err {err:.1e})", t,
                         flops / t / 1e12, flops / t / flops_ceiling))
        except Exception as e:  # noqa: BLE001
            rows.append((f"prefill T={T}", f"attention_mgpu {bq}x{bkv} FAILED {type(e).__name__}: "
                         f"{str(e)[:80]}", 0, 0, 0))


def run_prefill_ragged(rows, flops_ceiling, quick):
    """An engine-like prefill batch: 8 chunks of uneven lengths (ends mid-tile) after cached
    prefixes, 4096 query tokens in all; FLOPs counted per query row over the keys it sees."""
    H, KV, D, S = (8, 2, 64, 16) if quick else (32, 8, 128, 16)
    chunks = [16, 40, 9, 64, 3, 24, 8, 36] if quick else [300, 700, 129, 1000, 467, 800, 200, 500]
    prefix = [0, 512, 1000, 0, 256, 2000, 64, 1024]
    kv = [p + m for p, m in zip(prefix, chunks)]
    need = [-(-n // S) for n in kv]
    rng = np.random.default_rng(1)
    P = 1 + sum(need)
    perm = rng.permutation(np.arange(1, P)).astype(np.int32)
    table = np.zeros((len(kv), max(need)), np.int32)
    off = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[off:off + n]
        off += n
    T = sum(chunks)
    q = jax.random.normal(jax.random.key(6), (T, H, D), jnp.bfloat16)
    kp = jax.random.normal(jax.random.key(7), (1, P, S, KV, D), jnp.bfloat16)
    vp = jax.random.normal(jax.random.key(8), (1, P, S, KV, D), jnp.bfloat16)
    args = (jnp.asarray(table), jnp.asarray(np.concatenate([[0], np.cumsum(chunks)]), jnp.int32),
            jnp.asarray(kv, jnp.int32))
    flops = 4 * H * D * sum(m * p + m * (m + 1) / 2 for p, m in zip(prefix, chunks))
    case = f"prefill ragged 8 chunks T={T}"
    want = jax.jit(lambda q, k, v, pt, cu, kl: ref.paged_prefill_attention(
        q, k, v, 0, pt, cu, kl, max_q_len=max(chunks), scale=D ** -0.5))(q, kp, vp, *args)
    ours_prefill_rows(rows, case, (q, kp, vp, *args), max(chunks), want, flops, flops_ceiling)


def ours_prefill_rows(rows, case, args, max_q_len, want, flops, flops_ceiling):
    """Rows for our prefill entry point on args (q, k_pool, v_pool, page_table, cu, kv_lens;
    layer 0): impl=auto (Mosaic GPU on a GPU), then on a GPU the Triton-lowered kernel."""
    D = args[0].shape[-1]
    for name, kw in (("ours (auto: Mosaic GPU on a GPU)", {}), ("ours, Pallas-Triton", {"impl": "triton"})):
        if kw and jax.devices()[0].platform != "gpu":
            continue
        f = jax.jit(lambda q, k, v, pt, cu, kl, kw=kw: pk.paged_prefill_attention(
            q, k, v, 0, pt, cu, kl, max_q_len=max_q_len, scale=D ** -0.5, **kw, **PREFILL_KW))
        err = rel_err(f(*args), want)
        t = bench(f, *args, iters=10)
        rows.append((case, f"{name} (pages, err {err:.1e})", t, flops / t / 1e12, flops / t / flops_ceiling))


def run_movement(rows, bw, quick):
    """KV write of one step (decode 64 tokens, prefill 4096) and page staging of 256 pages x all
    layers: XLA's scatter/gather against ours, bytes moved against the copy ceiling."""
    L, S, KV, D = (2, 16, 2, 64) if quick else (32, 16, 8, 128)
    P = 64 if quick else 8192
    kp = jnp.zeros((L, P, S, KV, D), jnp.bfloat16)
    vp = jnp.zeros((L, P, S, KV, D), jnp.bfloat16)
    rng = np.random.default_rng(0)
    pools = [kp, vp]  # threaded through every donating call
    for T in ((16,) if quick else (64, 4096)):
        slots = jnp.asarray(rng.permutation(np.arange(S, P * S))[:T], jnp.int32)
        k = jax.random.normal(jax.random.key(7), (T, KV, D), jnp.bfloat16)
        nbytes = 2 * 2 * T * KV * D * 2  # read and write K and V rows
        for name, fn in (("XLA scatter", ref.write_kv), ("ours, Pallas", pk.write_kv)):
            f = jax.jit(fn, donate_argnums=(0, 1))

            def step():
                pools[:] = f(pools[0], pools[1], 3, k, k, slots)
                return pools[0]
            t = bench(lambda: step(), iters=20)
            rows.append((f"write_kv T={T}", name, t, nbytes / t / 1e12, nbytes / t / bw))
        kp, vp = pools
    n = 8 if quick else 256
    ids = jnp.asarray(rng.permutation(np.arange(1, P))[:n], jnp.int32)
    nbytes = 2 * n * L * S * KV * D * 2
    want = ref.gather_pages(kp, ids)
    for name, fn in (("XLA gather", ref.gather_pages), ("ours, Pallas", pk.gather_pages)):
        f = jax.jit(fn)
        ok = bool(jnp.all(f(kp, ids) == want))
        t = bench(f, kp, ids)
        rows.append((f"gather {n} pages x {L} layers", f"{name}{'' if ok else ' MISMATCH'}", t,
                     nbytes / t / 1e12, nbytes / t / bw))
    staged = want
    for name, fn in (("XLA scatter", ref.scatter_pages), ("ours, Pallas", pk.scatter_pages)):
        f = jax.jit(fn, donate_argnums=0)
        box = [kp]

        def sc():
            box[0] = f(box[0], ids, staged)
            return box[0]
        t = bench(lambda: sc())
        rows.append((f"scatter {n} pages x {L} layers", name, t, nbytes / t / 1e12, nbytes / t / bw))
        kp = box[0]


def sweep(bw, fl):
    """Tile choices of our kernels at the issue's shapes; prints its own table."""
    q, k, v, pt, lens = decode_case(64, 2048)
    kv_bytes = 2 * 64 * 2048 * 8 * 128 * 2
    print("decode B=64 ctx=2048 sweep: block_k num_splits warps stages -> ms ratio")
    for bk, ns, w, st in [(64, None, 4, 2), (64, 1, 4, 3), (128, 1, 4, 2), (128, 1, 8, 3), (32, 1, 4, 3),
                          (64, 1, 2, 3), (64, 2, 4, 2), (256, 1, 8, 2)]:
        try:
            f = jax.jit(lambda q, k, v, pt, l: pk.paged_decode_attention(
                q, k, v, 0, pt, l, scale=0.088, block_k=bk, num_splits=ns, num_warps=w, num_stages=st))
            t = bench(f, q, k, v, pt, lens)
            print(f"  {bk:>4} {str(ns):>5} {w:>2} {st:>2} -> {t * 1e3:.3f} {kv_bytes / t / bw:.3f}")
        except Exception as e:  # noqa: BLE001
            print(f"  {bk} {ns} {w} {st} FAILED {type(e).__name__}: {str(e)[:200]}")
    T, H, D, S = 4096, 32, 128, 16
    qp = jax.random.normal(jax.random.key(3), (T, H, D), jnp.bfloat16)
    P = T // S
    perm = np.random.default_rng(0).permutation(np.arange(1, P + 1)).astype(np.int32)
    kp = jax.random.normal(jax.random.key(4), (1, P + 1, S, 8, D), jnp.bfloat16)
    flops = 4 * T * T / 2 * H * D
    print("prefill T=4096 sweep: block_q (rows: tokens x 4 heads) block_k warps stages -> ms TFLOP/s")
    for bq, bk, w, st in [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (64, 128, 4, 3), (256, 64, 8, 3),
                          (256, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 256, 8, 3)]:
        try:
            f = jax.jit(lambda q, k: pk.paged_prefill_attention(
                q, k, k, 0, jnp.asarray(perm)[None], jnp.asarray([0, T], jnp.int32), jnp.asarray([T], jnp.int32),
                max_q_len=T, scale=0.088, block_q=bq, block_k=bk, num_warps=w, num_stages=st, impl="triton"))
            t = bench(f, qp, kp, iters=5)
            print(f"  {bq:>4} {bk:>4} {w:>2} {st:>2} -> {t * 1e3:.3f} {flops / t / 1e12:.1f}")
        except Exception as e:  # noqa: BLE001
            print(f"  {bq} {bk} {w} {st} FAILED {type(e).__name__}: {str(e)[:200]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--sweep", action="store_true", help="also sweep our kernels' tile choices")
    ap.add_argument("--only", nargs="+", choices=["decode", "prefill", "movement"],
                    default=["decode", "prefill", "movement"], help="which kernels to measure")
    a = ap.parse_args()
    rows, bw, fl = ceilings(a.quick)
    if a.sweep and not a.quick:
        sweep(bw, fl)
    cases = [(2, 64)] if a.quick else [(64, 2048), (64, 512), (64, 8192), (1, 2048), (256, 2048)]
    for B, ctx in cases if "decode" in a.only else ():
        run_decode(rows, bw, B, ctx, a.quick)
    if "prefill" in a.only:
        run_prefill(rows, fl, 128 if a.quick else 4096, a.quick)
        run_prefill_ragged(rows, fl, a.quick)
    if "movement" in a.only:
        run_movement(rows, bw, a.quick)
    print(f"device: {jax.devices()[0].device_kind}; decode and KV movement: TB/s of bytes that must move, "
          "ratio to the copy ceiling; prefill: TFLOP/s, ratio to the matmul")
    print(f"{'case':<30} {'implementation':<40} {'ms':>9} {'TB/s|TFLOP/s':>13} {'ratio':>7}")
    for case, impl, t, rate, ratio in rows:
        print(f"{case:<30} {impl:<40} {t * 1e3:>9.3f} {rate:>13.3f} {ratio:>7.3f}")
    by = {(c, i.split(" (")[0]): t for c, i, t, _, _ in rows}
    for c in sorted({c for c, _ in by}):
        if (c, "ours, Pallas") in by and (c, "pallas paged_attention") in by:
            print(f"{c}: ours is {by[(c, 'pallas paged_attention')] / by[(c, 'ours, Pallas')]:.2f}x "
                  "the deprecated Pallas kernel")
        for mine in ("ours", "ours, Pallas-Triton"):
            if (c, mine) in by and (c, "cuDNN") in by:
                print(f"{c}: {mine} runs at {by[(c, 'cuDNN')] / by[(c, mine)]:.2f}x cuDNN's throughput")


if __name__ == "__main__":
    main()
