"""Attention and KV-movement kernels against the ceilings and baselines, all measured in
the same run. The table comes last.

    python -m toolkit.bench.attention                        # GPU: every kernel, full shapes
    python -m toolkit.bench.attention bench.quick=true       # CPU smoke run (tiny shapes)
    python -m toolkit.bench.attention "bench.only=[prefill]" bench.sweep=true

Ceilings: a large device-to-device copy (bytes read + written per second, the best of an
XLA and a torch copy) and a large bf16 matmul. Decode rows count the K/V bytes each kernel
must read (every sequence's context, K and V, once); prefill rows count causal FLOPs
(4 * T^2/2 * H * D per sequence). Baselines: JAX's deprecated Pallas paged_attention
(decode) and jax.nn.dot_product_attention(implementation="cudnn") on contiguous data
(prefill), and JAX's Mosaic GPU attention_mgpu on contiguous data (what a TMA/wgmma kernel
reaches here). ``rate`` is TB/s (decode, KV movement) or TFLOP/s (prefill); ``ratio`` is
against the copy or the matmul ceiling.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kernels import attention as attn
from kernels import attention_pallas as pk
from kernels import attention_ref as ref
from toolkit.bench import config, core
from toolkit.bench.core import bench
from toolkit.cache.allocator import pages_for
from toolkit.cli import hydra_main
from toolkit.config.validate import ConfigError

config.register()
COLS = ["case", "implementation", "ms", "rate", "ratio"]
PREFILL_KW: dict = {}  # tile choice for our prefill kernel (set here from a sweep's best row)


def row(case: str, impl: str, t: float, amount: float, ceiling: float) -> dict:
    """A table row: ``amount`` bytes (or FLOPs) done in ``t`` seconds, against ``ceiling``/s."""
    rate = amount / t if t else 0.0
    return {"case": case, "implementation": impl, "ms": t * 1e3, "rate": rate / 1e12,
            "ratio": rate / ceiling if ceiling else 0.0}


def ceilings(quick: bool) -> tuple[list[dict], float, float]:
    """Copy ceiling (best of the copies) and the bf16 matmul ceiling, as table rows."""
    copies = core.copy_ceilings((1 << 20) if quick else (1 << 31), torch_copy=not quick)
    bw = max(b for _, _, b in copies)
    rows = [row("ceiling", name, t, b * t, bw) for name, t, b in copies]
    t, fl = core.matmul_ceiling(512 if quick else 8192)
    rows.append(row("ceiling", "bf16 matmul", t, fl * t, fl))
    return rows, bw, fl


def rel_err(got, want) -> float:
    got, want = (jnp.asarray(x, jnp.float32) for x in (got, want))
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


# Layers in the benchmark pools: the kernels read layer LAYERS-1 of a page-major pool
# [P, L, S, KV, D], so a page's tile sits L tiles from the next page's as in the engine.
LAYERS = 4
LAYER = LAYERS - 1


def decode_case(B, ctx, H=32, KV=8, D=128, S=16, dtype=jnp.bfloat16, seed=0):
    """Random pool and non-contiguous random page tables; our layout [P, L, S, KV, D]."""
    rng = np.random.default_rng(seed)
    ppseq = pages_for(ctx, S)
    P = B * ppseq + 1
    pages = rng.permutation(np.arange(1, P))[:B * ppseq].reshape(B, ppseq).astype(np.int32)
    k = jax.random.normal(jax.random.key(seed), (P, LAYERS, S, KV, D), dtype)
    v = jax.random.normal(jax.random.key(seed + 1), (P, LAYERS, S, KV, D), dtype)
    q = jax.random.normal(jax.random.key(seed + 2), (B, H, D), dtype)
    lens = jnp.full((B,), ctx, jnp.int32)
    return q, k, v, jnp.asarray(pages), lens


def run_decode(rows, bw, B, ctx, quick):
    q, k, v, pt, lens = decode_case(B, ctx, H=8 if quick else 32, KV=2 if quick else 8, D=64 if quick else 128)
    D = q.shape[-1]
    kv_bytes = 2 * B * ctx * k.shape[3] * D * k.dtype.itemsize
    refj = jax.jit(lambda q, k, v, pt, l: ref.paged_decode_attention(q, k, v, LAYER, pt, l, scale=D ** -0.5))
    out_ref = refj(q, k, v, pt, lens)
    t = bench(refj, q, k, v, pt, lens)
    rows.append(row(f"decode B={B} ctx={ctx}", "jnp reference", t, kv_bytes, bw))
    ours = jax.jit(lambda q, k, v, pt, l: pk.paged_decode_attention(q, k, v, LAYER, pt, l, scale=D ** -0.5))
    err = rel_err(ours(q, k, v, pt, lens), out_ref)
    t = bench(ours, q, k, v, pt, lens)
    rows.append(row(f"decode B={B} ctx={ctx}", f"ours, Pallas (err {err:.1e})", t, kv_bytes, bw))
    if jax.devices()[0].platform != "gpu":
        return
    try:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        kp, vp = (jnp.transpose(x[:, LAYER], (2, 0, 1, 3)) for x in (k, v))  # [KV, P, S, D]
        # that kernel does not scale the logits: pass q pre-scaled by 1/sqrt(D)
        pa = jax.jit(lambda q, kp, vp, pt, l: paged_attention(q * jnp.asarray(D ** -0.5, q.dtype), kp, vp, pt, l))
        got = pa(q, kp, vp, pt, lens)
        err = rel_err(got, out_ref)
        t = bench(pa, q, kp, vp, pt, lens)
        rows.append(row(f"decode B={B} ctx={ctx}", f"pallas paged_attention (err {err:.1e})", t, kv_bytes, bw))
    except Exception as e:  # noqa: BLE001 -- a baseline that fails is reported, not fatal
        rows.append(row(f"decode B={B} ctx={ctx}", f"pallas paged_attention FAILED {type(e).__name__}", 0.0, 0, 0))


def run_prefill(rows, flops_ceiling, T, quick):
    H, KV, D, S = (8, 2, 64, 16) if quick else (32, 8, 128, 16)
    q = jax.random.normal(jax.random.key(3), (T, H, D), jnp.bfloat16)
    kc = jax.random.normal(jax.random.key(4), (T, KV, D), jnp.bfloat16)
    vc = jax.random.normal(jax.random.key(5), (T, KV, D), jnp.bfloat16)
    P = T // S
    perm = np.random.default_rng(0).permutation(np.arange(1, P + 1)).astype(np.int32)
    pool = lambda x: jnp.zeros((P + 1, LAYERS, S, KV, D), x.dtype).at[perm, LAYER].set(x.reshape(P, S, KV, D))  # noqa: E731
    kp, vp = pool(kc), pool(vc)
    flops = 4 * T * T / 2 * H * D
    paged = (jnp.asarray(perm)[None], jnp.asarray([0, T], jnp.int32), jnp.asarray([T], jnp.int32))
    ours = jax.jit(lambda q, k, v: ref.paged_prefill_attention(q, k, v, LAYER, *paged, max_q_len=T, scale=D ** -0.5))
    out_ref = ours(q, kp, vp)
    t = bench(ours, q, kp, vp, iters=5)
    rows.append(row(f"prefill T={T}", "jnp reference (pages)", t, flops, flops_ceiling))
    ours_prefill_rows(rows, f"prefill T={T}", (q, kp, vp, *paged), T, out_ref, flops, flops_ceiling)
    if jax.devices()[0].platform != "gpu":
        return
    try:
        rep = H // KV
        cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q[None], jnp.repeat(k, rep, 1)[None], jnp.repeat(v, rep, 1)[None], is_causal=True,
            implementation="cudnn"))
        t = bench(cud, q, kc, vc, iters=10)
        rows.append(row(f"prefill T={T}", "cuDNN (contiguous data)", t, flops, flops_ceiling))
    except Exception as e:  # noqa: BLE001
        rows.append(row(f"prefill T={T}", f"cuDNN FAILED {type(e).__name__}", 0.0, 0, 0))
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
            rows.append(row(f"prefill T={T}", f"JAX attention_mgpu {bq}x{bkv} f16 (contiguous, err {err:.1e})",
                            t, flops, flops_ceiling))
        except Exception as e:  # noqa: BLE001
            rows.append(row(f"prefill T={T}", f"attention_mgpu {bq}x{bkv} FAILED {type(e).__name__}: "
                         f"{str(e)[:80]}", 0.0, 0, 0))


def run_prefill_ragged(rows, flops_ceiling, quick):
    """An engine-like prefill batch: 8 chunks of uneven lengths (ends mid-tile) after cached
    prefixes, 4096 query tokens in all; FLOPs counted per query row over the keys it sees."""
    H, KV, D, S = (8, 2, 64, 16) if quick else (32, 8, 128, 16)
    chunks = [16, 40, 9, 64, 3, 24, 8, 36] if quick else [300, 700, 129, 1000, 467, 800, 200, 500]
    prefix = [0, 512, 1000, 0, 256, 2000, 64, 1024]
    kv = [p + m for p, m in zip(prefix, chunks)]
    need = [pages_for(n, S) for n in kv]
    rng = np.random.default_rng(1)
    P = 1 + sum(need)
    table = ref.scattered_page_table(rng, need, P)
    T = sum(chunks)
    q = jax.random.normal(jax.random.key(6), (T, H, D), jnp.bfloat16)
    kp = jax.random.normal(jax.random.key(7), (P, LAYERS, S, KV, D), jnp.bfloat16)
    vp = jax.random.normal(jax.random.key(8), (P, LAYERS, S, KV, D), jnp.bfloat16)
    args = (jnp.asarray(table), jnp.asarray(np.concatenate([[0], np.cumsum(chunks)]), jnp.int32),
            jnp.asarray(kv, jnp.int32))
    flops = 4 * H * D * sum(m * p + m * (m + 1) / 2 for p, m in zip(prefix, chunks))
    case = f"prefill ragged 8 chunks T={T}"
    want = jax.jit(lambda q, k, v, pt, cu, kl: ref.paged_prefill_attention(
        q, k, v, LAYER, pt, cu, kl, max_q_len=max(chunks), scale=D ** -0.5))(q, kp, vp, *args)
    ours_prefill_rows(rows, case, (q, kp, vp, *args), max(chunks), want, flops, flops_ceiling)


def ours_prefill_rows(rows, case, args, max_q_len, want, flops, flops_ceiling):
    """Rows for our prefill entry point on args (q, k_pool, v_pool, page_table, cu, kv_lens;
    layer LAYER): impl=auto (Mosaic GPU on a GPU), then on a GPU the Triton-lowered kernel."""
    D = args[0].shape[-1]
    for name, kw in (("ours (auto: Mosaic GPU on a GPU)", {}), ("ours, Pallas-Triton", {"impl": "triton"})):
        if kw and jax.devices()[0].platform != "gpu":
            continue
        f = jax.jit(lambda q, k, v, pt, cu, kl, kw=kw: attn.paged_prefill_attention(
            q, k, v, LAYER, pt, cu, kl, max_q_len=max_q_len, scale=D ** -0.5, **kw, **PREFILL_KW))
        err = rel_err(f(*args), want)
        t = bench(f, *args, iters=10)
        rows.append(row(case, f"{name} (pages, err {err:.1e})", t, flops, flops_ceiling))


def run_movement(rows, bw, quick):
    """KV write of one step (decode 64 tokens, prefill 4096) and page staging of 256 pages x all
    layers: XLA's scatter/gather against ours, bytes moved against the copy ceiling."""
    L, S, KV, D = (2, 16, 2, 64) if quick else (32, 16, 8, 128)
    P = 64 if quick else 8192
    kp = jnp.zeros((P, L, S, KV, D), jnp.bfloat16)
    vp = jnp.zeros((P, L, S, KV, D), jnp.bfloat16)
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
            rows.append(row(f"write_kv T={T}", name, t, nbytes, bw))
        kp, vp = pools
    n = 8 if quick else 256
    ids = jnp.asarray(rng.permutation(np.arange(1, P))[:n], jnp.int32)
    nbytes = 2 * n * L * S * KV * D * 2
    want = ref.gather_pages(kp, ids)
    for name, fn in (("XLA gather", ref.gather_pages), ("ours, Pallas", pk.gather_pages)):
        f = jax.jit(fn)
        ok = bool(jnp.all(f(kp, ids) == want))
        t = bench(f, kp, ids)
        rows.append(row(f"gather {n} pages x {L} layers", f"{name}{'' if ok else ' MISMATCH'}", t, nbytes, bw))
    staged = want
    for name, fn in (("XLA scatter", ref.scatter_pages), ("ours, Pallas", pk.scatter_pages)):
        f = jax.jit(fn, donate_argnums=0)
        box = [kp]

        def sc():
            box[0] = f(box[0], ids, staged)
            return box[0]
        t = bench(lambda: sc())
        rows.append(row(f"scatter {n} pages x {L} layers", name, t, nbytes, bw))
        kp = box[0]


def _sweep_row(kernel: str, tiles: str, fn, *args, iters: int = 20, amount: float, ceiling: float) -> dict:
    try:
        return row(kernel, tiles, bench(fn, *args, iters=iters), amount, ceiling)
    except Exception as e:  # noqa: BLE001 -- a tile choice that does not compile is a row, not the end
        return row(kernel, f"{tiles} FAILED {type(e).__name__}: {str(e)[:120]}", 0.0, 0, 0)


def sweep(bw: float, fl: float) -> list[dict]:
    """Tile choices of our kernels at the issue's shapes (GPU); printed as its own table
    before the main one."""
    q, k, v, pt, lens = decode_case(64, 2048)
    kv_bytes = 2 * 64 * 2048 * 8 * 128 * 2
    rows = []
    for bk, ns, w, st in [(64, None, 4, 2), (64, 1, 4, 3), (128, 1, 4, 2), (128, 1, 8, 3), (32, 1, 4, 3),
                          (64, 1, 2, 3), (64, 2, 4, 2), (256, 1, 8, 2)]:
        f = jax.jit(lambda q, k, v, pt, l, bk=bk, ns=ns, w=w, st=st: pk.paged_decode_attention(
            q, k, v, LAYER, pt, l, scale=0.088, block_k=bk, num_splits=ns, num_warps=w, num_stages=st))
        rows.append(_sweep_row("decode B=64 ctx=2048 sweep", f"block_k {bk} splits {ns} warps {w} stages {st}",
                               f, q, k, v, pt, lens, amount=kv_bytes, ceiling=bw))
    T, H, D, S = 4096, 32, 128, 16
    qp = jax.random.normal(jax.random.key(3), (T, H, D), jnp.bfloat16)
    P = T // S
    perm = np.random.default_rng(0).permutation(np.arange(1, P + 1)).astype(np.int32)
    kp = jax.random.normal(jax.random.key(4), (P + 1, LAYERS, S, 8, D), jnp.bfloat16)
    flops = 4 * T * T / 2 * H * D
    for bq, bk, w, st in [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (64, 128, 4, 3), (256, 64, 8, 3),
                          (256, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 256, 8, 3)]:
        # block_q rows are tokens x 4 heads (GQA-packed)
        f = jax.jit(lambda q, k, bq=bq, bk=bk, w=w, st=st: pk.paged_prefill_attention(
            q, k, k, LAYER, jnp.asarray(perm)[None], jnp.asarray([0, T], jnp.int32), jnp.asarray([T], jnp.int32),
            max_q_len=T, scale=0.088, block_q=bq, block_k=bk, num_warps=w, num_stages=st))
        rows.append(_sweep_row("prefill T=4096 sweep (Triton)", f"block_q {bq} block_k {bk} warps {w} stages {st}",
                               f, qp, kp, iters=5, amount=flops, ceiling=fl))
    return rows


def comparisons(rows: list[dict]) -> list[str]:
    """One line per case where ours and a baseline both ran: how many times faster ours is."""
    by = {(r["case"], r["implementation"].split(" (")[0]): r["ms"] for r in rows if r["ms"]}
    out = []
    for c in sorted({c for c, _ in by}):
        if (c, "ours, Pallas") in by and (c, "pallas paged_attention") in by:
            out.append(f"{c}: ours is {by[(c, 'pallas paged_attention')] / by[(c, 'ours, Pallas')]:.2f}x "
                       "the deprecated Pallas kernel")
        for mine in ("ours", "ours, Pallas-Triton"):
            if (c, mine) in by and (c, "cuDNN") in by:
                out.append(f"{c}: {mine} runs at {by[(c, 'cuDNN')] / by[(c, mine)]:.2f}x cuDNN's throughput")
    return out


def run_bench(b: config.AttentionBench, rows: list[dict], bw: float, fl: float) -> list[dict]:
    """Every case in ``bench.only`` appended to ``rows`` (the ceilings' rows: bytes/s ``bw``
    and FLOP/s ``fl``)."""
    cases = [(2, 64)] if b.quick else [(64, 2048), (64, 512), (64, 8192), (1, 2048), (256, 2048)]
    work = [("decode", lambda B=B, ctx=ctx: run_decode(rows, bw, B, ctx, b.quick)) for B, ctx in cases]
    work += [("prefill", lambda: run_prefill(rows, fl, 128 if b.quick else 4096, b.quick)),
             ("prefill", lambda: run_prefill_ragged(rows, fl, b.quick)),
             ("movement", lambda: run_movement(rows, bw, b.quick))]
    for _, fn in tqdm([w for w in work if w[0] in b.only], desc="attention cases", file=sys.stderr):
        fn()
    return rows


def job(cfg: config.AttentionRun) -> None:
    b = cfg.bench
    unknown = set(b.only) - {"decode", "prefill", "movement"}
    if unknown:
        raise ConfigError(f"bench.only has {sorted(unknown)}; allowed: decode, prefill, movement")
    card = core.device_card()
    rows, bw, fl = ceilings(b.quick)
    if b.sweep and not b.quick:
        print("\n".join(core.format_table(sweep(bw, fl), COLS)))
    run_bench(b, rows, bw, fl)
    core.report("attention", rows, COLS, card=card, config=b, json_out=b.json_out, notes=tuple(comparisons(rows)),
                title="Attention and KV movement: rate = TB/s of bytes that must move (decode, movement; ratio "
                      "to the copy ceiling) or TFLOP/s (prefill; ratio to the bf16 matmul)")



main = hydra_main(job, config_name="bench/attention")

if __name__ == "__main__":
    main()
