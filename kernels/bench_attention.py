"""Attention benchmark on the GPU: our implementations against the ceilings and baselines,
all measured in the same run (kernels issue). Prints a table last.

    python3 -m kernels.bench_attention            # on the device machine
    python3 -m kernels.bench_attention --quick    # CPU smoke run (tiny shapes)

Ceilings: a large device-to-device copy (bytes read + written per second) and a large
bf16 matmul. Decode rows count the K/V bytes each kernel must read (every sequence's
context, K and V, once); prefill rows count causal FLOPs (4 * T^2/2 * H * D per sequence).
Baselines: JAX's deprecated Pallas paged_attention (decode) and
jax.nn.dot_product_attention(implementation="cudnn") on contiguous data (prefill).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import attention_ref as ref


def bench(fn, *args, warmup=3, iters=20) -> float:
    """Median seconds of fn(*args) (device-synchronised)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def ceilings(quick: bool) -> tuple[float, float]:
    n = (1 << 20) if quick else (1 << 30)  # bytes
    x = jax.random.normal(jax.random.key(0), (n // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    t = bench(copy, x)
    bw = 2 * n / t
    m = 512 if quick else 8192
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    t = bench(jax.jit(lambda p, q: p @ q), a, b)
    return bw, 2 * m ** 3 / t


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
    ours = jax.jit(lambda q, k, v, pt, l: ref.paged_decode_attention(q, k, v, 0, pt, l, scale=D ** -0.5))
    out_ref = ours(q, k, v, pt, lens)
    t = bench(ours, q, k, v, pt, lens)
    rows.append((f"decode B={B} ctx={ctx}", "jnp reference", t, kv_bytes / t / 1e12, kv_bytes / t / bw))
    if jax.devices()[0].platform != "gpu":
        return
    try:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        kp, vp = (jnp.transpose(x[0], (2, 0, 1, 3)) for x in (k, v))  # [KV, P, S, D]
        # that kernel does not scale the logits: pass q pre-scaled by 1/sqrt(D)
        pa = jax.jit(lambda q, kp, vp, pt, l: paged_attention(q * jnp.asarray(D ** -0.5, q.dtype), kp, vp, pt, l))
        got = pa(q, kp, vp, pt, lens)
        err = float(jnp.linalg.norm((got - out_ref).astype(jnp.float32)) /
                    jnp.linalg.norm(out_ref.astype(jnp.float32)))
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
    ours = jax.jit(lambda q, k, v: ref.paged_prefill_attention(
        q, k, v, 0, jnp.asarray(perm)[None], jnp.asarray([0, T], jnp.int32), jnp.asarray([T], jnp.int32),
        max_q_len=T, scale=D ** -0.5))
    t = bench(ours, q, kp, vp, iters=5)
    rows.append((f"prefill T={T}", "jnp reference (pages)", t, flops / t / 1e12, flops / t / flops_ceiling))
    if jax.devices()[0].platform != "gpu":
        return
    try:
        rep = H // KV
        cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q[None], jnp.repeat(k, rep, 1)[None], jnp.repeat(v, rep, 1)[None], is_causal=True,
            implementation="cudnn"))
        t = bench(cud, q, kc, vc, iters=10)
        rows.append((f"prefill T={T}", "cuDNN (contiguous)", t, flops / t / 1e12, flops / t / flops_ceiling))
    except Exception as e:  # noqa: BLE001
        rows.append((f"prefill T={T}", f"cuDNN FAILED {type(e).__name__}", 0, 0, 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    a = ap.parse_args()
    bw, fl = ceilings(a.quick)
    rows = [("ceiling", "device copy (read+write)", 0, bw / 1e12, 1.0), ("ceiling", "bf16 matmul", 0, fl / 1e12, 1.0)]
    cases = [(2, 64)] if a.quick else [(64, 2048), (64, 512), (64, 8192), (1, 2048), (256, 2048)]
    for B, ctx in cases:
        run_decode(rows, bw, B, ctx, a.quick)
    run_prefill(rows, fl, 128 if a.quick else 4096, a.quick)
    print(f"device: {jax.devices()[0].device_kind}; decode: TB/s of K/V read, ratio to the copy; "
          "prefill: TFLOP/s, ratio to the matmul")
    print(f"{'case':<22} {'implementation':<44} {'ms':>9} {'TB/s|TFLOP/s':>13} {'ratio':>7}")
    for case, impl, t, rate, ratio in rows:
        print(f"{case:<22} {impl:<44} {t * 1e3:>9.3f} {rate:>13.3f} {ratio:>7.3f}")


if __name__ == "__main__":
    main()
