"""Ways to move KV pages between an H200 and host memory, timed side by side (which one the
host tier should use): numpy fancy-index gathers (one thread, threaded), device_put from
pageable numpy, from a pinned torch tensor's numpy view, torch pinned -> CUDA + DLPack, and
device_put to pinned_host.    python scripts/gpu/probe_host_copies.py [MiB]"""
import concurrent.futures as cf
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

MiB = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
PAGE = (32, 16, 8, 128)  # L, S, KV, Dh (8B shape), bf16: 1 MiB per buffer per page
n = MiB  # pages of 1 MiB
H = 2 * n
dt = jnp.bfloat16
pool = jnp.zeros((n + 1,) + PAGE, dt)
host = np.zeros((H,) + PAGE, dt)
host[:] = 1
slots = np.random.default_rng(0).permutation(H)[:n]
pool_ex = cf.ThreadPoolExecutor(16)


def timed(name, fn, reps=3):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    t = min(ts)
    print(f"{name:60s} {t * 1e3:8.1f} ms {MiB / 1024 / t:7.1f} GiB/s", flush=True)


def gather1():
    return host[slots]


def gather_threads(out=None, k=16):
    out = np.empty((n,) + PAGE, dt) if out is None else out
    parts = np.array_split(np.arange(n), k)
    list(pool_ex.map(lambda p: np.take(host, slots[p], axis=0, out=out[p[0]:p[-1] + 1]), parts))
    return out


stage = np.empty((n,) + PAGE, dt)
timed("numpy fancy index (1 thread)", gather1)
timed("numpy take into staging (16 threads)", lambda: gather_threads(stage))
dev = jax.devices()[0]
timed("device_put(pageable numpy)", lambda: jax.block_until_ready(jax.device_put(stage, dev)))
try:
    import torch

    pinned = torch.empty(stage.shape, dtype=torch.bfloat16, pin_memory=True)
    pin_np = pinned.view(torch.int16).numpy().view(dt)
    gather_threads(pin_np)
    timed("device_put(numpy view of pinned torch)", lambda: jax.block_until_ready(jax.device_put(pin_np, dev)))

    def torch_path():
        g = pinned.cuda(non_blocking=True)
        return jax.block_until_ready(jax.dlpack.from_dlpack(g))

    timed("torch pinned -> cuda (non_blocking) -> dlpack", torch_path)
    host_t = torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
    idx_t = torch.from_numpy(slots)
    timed("torch index_select host -> pinned staging", lambda: torch.index_select(host_t, 0, idx_t, out=pinned))
except Exception as e:  # noqa: BLE001
    print("torch paths failed:", e)
ph = pool.sharding.with_memory_kind("pinned_host")
g = jax.jit(lambda p, i: p[i])
idx = np.arange(1, n + 1, dtype=np.int32)
timed("jit gather + device_put(pinned_host)", lambda: jax.block_until_ready(jax.device_put(g(pool, idx), ph)))
arr = jax.block_until_ready(jax.device_put(g(pool, idx), ph))
a = np.asarray(arr)
timed("pinned -> host tier store (1 thread)", lambda: host.__setitem__(slots, a))


def store_threads(k=16):
    parts = np.array_split(np.arange(n), k)

    def put(p):
        host[slots[p]] = a[p]
    list(pool_ex.map(put, parts))


timed("pinned -> host tier store (16 threads)", store_threads)
timed("device_put(pinned jax array) -> device", lambda: jax.block_until_ready(jax.device_put(arr, pool.sharding)))
