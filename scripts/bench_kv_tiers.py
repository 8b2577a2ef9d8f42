"""The KV tiers below the device prefix cache (toolkit/cache/tiers.py): what moving pages
between them costs, and what they buy a multi-turn workload whose working set is several
times the device pool.

    python scripts/bench_kv_tiers.py                       # CPU: both parts, small sizes (~1-2 min)
    python scripts/bench_kv_tiers.py --part movement       # only the copies (seconds)
    python scripts/bench_kv_tiers.py --gpu                 # one GPU: 8B-shaped pages, random-8b server

Part 1, ``movement``: GB/s of each copy the tiers make, with the real classes (``KVPool``,
``PoolMover``, ``HostTier``, ``FileTier``) doing what ``KVTiers`` does with them:

- device -> host: ``PoolMover.gather`` (a jitted gather, then ``device_put`` to pinned host
  memory on a GPU), polled with ``is_ready`` until observed complete, ``np.asarray`` and a
  store into the host tier's slots (``KVTiers._end_d2h``);
- host -> device: the host slots fancy-indexed, ``PoolMover.scatter`` (pads to the bucket,
  donated jitted scatter), blocked until the pool is ready (``KVTiers.load``);
- host -> file / file -> host: ``FileTier.post("WRITE" | "READ")`` (NIXL's POSIX plugin, two
  descriptors a page: K and V) and ``FileTier.wait``.

Each for a scattered page set (random device pages, host slots and file slots, in random
order: a tree's pages after some churn) and a contiguous one, against this run's baselines
of the same bytes: a device copy (a jitted gather of contiguous pages, device to device), a
host ``np.copyto``, and a plain ``os.pwrite`` / ``os.preadv`` of one contiguous buffer into
a file in the same directory. File rows say whether they were fsynced (``--fsync``: the
file tier itself never fsyncs its slots, so by default neither does the baseline) and
whether reads came from the page cache (default: the pages were just written) or from the
disk (``--cold-reads``: fsync + ``posix_fadvise(DONTNEED)`` before each read, untimed).
GB/s counts each byte moved once. Every path's bytes are checked after its last repeat.

Part 2, ``workload``: a unified server (``python -m serve role=unified``) per setting --
``cache=none``; ``radix`` (device only); ``radix`` + a host tier that holds the whole working
set; ``radix`` + that host tier + file storage; and ``radix`` + a small host tier (a couple of
device pools) + storage that holds everything, so that pages come back from the file too --
each driven by the same multi-turn load (``toolkit.bench.serve``'s ``shared_prefix``
workload with one long system prompt per conversation: conversations advance turn by
turn, so a conversation's history is reused only after every other conversation has taken
its turn; the working set, every conversation's last prompt, is several times the device
pool). Prints TTFT p50/avg/p99, request throughput, the fraction of prompt tokens served
from a cache, the server's tier gauges (/metrics), and against ``none``: TTFT ratios
(none / setting: > 1 is better) and the worst per-request TTFT slowdown (the same request
of the same deterministic workload in both runs: max over requests of setting / none).
Each setting starts its own server and stops it; the last of ``--rounds`` rounds is
reported (the first fills the compile caches on CPU, where shapes compile as they come).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from toolkit.bench import core  # noqa: E402

MIB = 1 << 20

# ---- sizes ------------------------------------------------------------------------------------

# page: (layers, page_size, kv_heads, head_dim, dtype). CPU: 256 KiB a page (K + V);
# GPU: Llama-3-8B's, 1 MiB per buffer a page (2 MiB with K and V), every layer of it.
MOVE = {"cpu": dict(page=(8, 16, 4, 64, "float32"), mib=32, repeats=5),
        "gpu": dict(page=(32, 16, 8, 128, "bfloat16"), mib=1024, repeats=5)}

# The workload: ``shared_prefix`` with num_prefixes = conversations (num_requests / turns),
# so each conversation has its own system prompt. Byte-level tokenizer: ~6 tokens a word.
# CPU: 16 conversations, last prompts ~480 tokens (~30 pages of 16): a working set of ~480
# pages against a pool of 80 (6x); host 1024 pages holds all of it, the small host 160.
# GPU: 32 conversations, ~4K-token system prompts growing to ~5.7K tokens (~360 pages):
# ~11.5K pages (23 GiB) against a pool of 2048 (4 GiB, 5.6x); host 16384 pages (32 GiB).
LOAD = {
    "cpu": dict(server=["model=tiny-random", "engine.page_size=16", "engine.num_pages=80", "engine.chunk_size=256",
                        "engine.max_batch_size=8", "engine.max_model_len=2048"],
                load=dict(num_requests=48, concurrency=2, num_prefixes=16, shared_prefix_len=40, input_len=8,
                          output_len=8, turns=3),
                host_pages=1024, small_host_pages=160, storage_gb=0.05, rounds=2, ready_timeout_s=600, env={}),
    # (CPU keeps the fine bucket set, shapes compiled on first use: compact shapes with
    # engine.warmup=true made every step ~30x slower on the jnp reference, 5 min a round.)
    # One server on the GPU: XLA's arena (weights, activations) at half the memory, the pool
    # (cudaMalloc'd, outside the arena) of engine.num_pages; engine=gpu compiles every step
    # shape before /health, so one round (the tier copies' gathers and scatters still compile
    # at their first use, a few power-of-two sizes: see xla_compilations in the table).
    "gpu": dict(server=["engine=gpu", "model=random-8b", "engine.memory_fraction=0", "engine.num_pages=2048",
                        "engine.max_model_len=8192", "engine.chunk_size=2048"],
                load=dict(num_requests=128, concurrency=4, num_prefixes=32, shared_prefix_len=680, input_len=40,
                          output_len=64, turns=4),
                host_pages=16384, small_host_pages=4096, storage_gb=24, rounds=1, ready_timeout_s=1800,
                env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}),
}

DEV_COPY = "device copy (jitted gather)"
MOVE_COLS = ["path", "pattern", "pages", "MiB", "ms", "GB_s", "baseline", "ratio", "verify", "detail"]
LOAD_COLS = ["setting", "requests", "failed", "req_per_s", "ttft_p50_ms", "ttft_avg_ms", "ttft_p99_ms",
             "e2e_p50_ms", "cached_fraction", "ttft_p50_x", "ttft_avg_x", "ttft_p99_x", "worst_slowdown",
             "req_per_s_x"]
GAUGE_COLS = ["setting", "hit_tokens", "device_hit_tokens", "host_hit_tokens", "storage_hit_tokens",
              "evicted_pages", "offloaded_host_MiB", "offloaded_storage_MiB", "loaded_host_MiB",
              "loaded_storage_MiB", "host_slots", "storage_slots", "copies_inflight", "xla_compilations"]


# ---- part 1: movement ---------------------------------------------------------------------------


def _fs_type(path: str) -> str:
    """The file system under ``path`` (from /proc/mounts; "?" elsewhere)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                real = os.path.realpath(path)
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, f"{typ} ({dev} on {mnt})"
    except OSError:
        pass
    return kind


def _pinned_host(dev) -> bool:
    """Whether ``PoolMover.gather`` lands in pinned host memory (a GPU that has it)."""
    return dev.platform == "gpu" and "pinned_host" in {m.kind for m in dev.addressable_memories()}


def _timed(fn, repeats: int) -> dict:
    """One untimed call (compiles), then ``repeats``; the median of each timing ``fn`` returns
    (a dict of seconds, "total" among them)."""
    fn()
    runs = [fn() for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _detail(t: dict) -> str:
    return ", ".join(f"{k} {v * 1e3:.2f}" for k, v in t.items() if k != "total")


def movement(a) -> tuple[list[dict], dict]:
    import jax
    import jax.numpy as jnp

    from kernels.attention_ref import gather_pages
    from toolkit.cache.pool import KVPool, PoolLayout
    from toolkit.cache.tiers import FileTier, HostTier, PoolMover, _pinned_torch_ok

    setup = MOVE["gpu" if a.gpu else "cpu"]
    L, S, KV, Dh, dtype = setup["page"]
    if a.layers:
        L = a.layers
    mib = a.mib or setup["mib"]
    repeats = a.repeats or setup["repeats"]
    one = PoolLayout(L, 1, S, KV, Dh, dtype)
    page_bytes = one.total_bytes  # K and V of one page, every layer
    n = max(1, mib * MIB // page_bytes)
    nbytes = n * page_bytes
    P, H = 4 * n + 1, 2 * n  # device pages (a 4x pool to scatter over), host and file slots
    pool = KVPool(PoolLayout(L, P, S, KV, Dh, dtype))
    rng = np.random.default_rng(0)

    # Fill the pool through the mover itself (its pointers must not move): page p holds random
    # page p % nb, so a page landing in the wrong place shows in the checks.
    nb = min(61, P)
    block = rng.standard_normal((nb,) + one.shape[1:], np.float32).astype(jnp.dtype(dtype))
    mover = PoolMover(pool)
    for lo in range(0, P, 64):
        pages = list(range(lo, min(P, lo + 64)))
        data = block[np.asarray(pages) % nb]
        mover.scatter(pages, data, data[::-1].copy())
    jax.block_until_ready((pool.k, pool.v))
    host = HostTier(one, H, pinned=jax.devices()[0].platform == "gpu" and _pinned_torch_ok())
    workdir = a.dir or tempfile.mkdtemp(prefix="kv-tiers-bench-")
    os.makedirs(workdir, exist_ok=True)
    storage = FileTier(os.path.join(workdir, "tier"), H, host, b"bench-kv-tiers", one)
    plain_path = os.path.join(workdir, "plain.bin")
    plain_fd = os.open(plain_path, os.O_RDWR | os.O_CREAT, 0o644)
    os.posix_fallocate(plain_fd, 0, nbytes)

    perm = rng.permutation(H)
    pats = {"scattered": dict(dev=rng.choice(np.arange(1, P), n, replace=False).tolist(),
                              dev2=rng.choice(np.arange(1, P), n, replace=False).tolist(),
                              host=perm[:n].tolist(), host2=perm[n:2 * n].tolist(),
                              file=rng.choice(H, n, replace=False).tolist()),
            "contiguous": dict(dev=list(range(1, n + 1)), dev2=list(range(n + 1, 2 * n + 1)),
                               host=list(range(n)), host2=list(range(n, 2 * n)), file=list(range(n)))}
    rows: list[dict] = []

    def row(path, pattern, t, baseline="", verify="-"):
        rows.append({"path": path, "pattern": pattern, "pages": n, "MiB": nbytes / MIB, "ms": t["total"] * 1e3,
                     "GB_s": nbytes / t["total"] / 1e9, "baseline": baseline, "verify": verify, "detail": _detail(t)})

    def sync_pool():
        jax.block_until_ready((pool.k, pool.v))

    # -- baselines: the same bytes on the device, in host memory
    dev_copy = jax.jit(lambda k, v, idx: (gather_pages(k, idx), gather_pages(v, idx)))
    contig = np.arange(1, n + 1, dtype=np.int32)

    def device_copy():
        sync_pool()
        t0 = time.perf_counter()
        jax.block_until_ready(dev_copy(pool.k, pool.v, contig))
        return {"total": time.perf_counter() - t0}

    row(DEV_COPY, "contiguous", _timed(device_copy, repeats))
    src, dst = np.concatenate([host.k[:n], host.v[:n]]), np.empty((2 * n,) + one.shape[1:], host.k.dtype)

    def host_copy():
        t0 = time.perf_counter()
        np.copyto(dst, src)
        return {"total": time.perf_counter() - t0}

    row("host memcpy (np.copyto)", "contiguous", _timed(host_copy, repeats))

    # -- device -> host, as KVTiers.backup + poll + _end_d2h
    for name, p in pats.items():
        def d2h(p=p):
            sync_pool()
            t0 = time.perf_counter()
            arrays = mover.gather(p["dev"])
            t1 = time.perf_counter()
            while not all(x.is_ready() for x in arrays):
                pass
            t2 = time.perf_counter()
            k, v = (np.asarray(x) for x in arrays)
            t3 = time.perf_counter()
            host.put(p["host"], k, v)  # (as KVTiers._end_d2h)
            t4 = time.perf_counter()
            return {"total": t4 - t0, "dispatch": t1 - t0, "ready": t2 - t1, "asarray": t3 - t2, "store": t4 - t3}

        t = _timed(d2h, repeats)
        idx = jnp.asarray(p["dev"], jnp.int32)
        ok = _same(host.k[p["host"]], np.asarray(pool.k[idx])) and _same(host.v[p["host"]], np.asarray(pool.v[idx]))
        row("device -> host (gather, ready, asarray, store)", name, t, DEV_COPY, "ok" if ok else "FAIL")

    # -- host -> device, as KVTiers.load
    for name, p in pats.items():
        def h2d(p=p):
            sync_pool()
            t0 = time.perf_counter()
            mover.load(p["dev2"], host, p["host"])  # (gathers the slots itself)
            t2 = time.perf_counter()
            sync_pool()
            t3 = time.perf_counter()
            return {"total": t3 - t0, "dispatch": t2 - t0, "ready": t3 - t2}

        t = _timed(h2d, repeats)
        idx = jnp.asarray(p["dev2"], jnp.int32)
        ok = _same(np.asarray(pool.k[idx]), host.k[p["host"]]) and _same(np.asarray(pool.v[idx]), host.v[p["host"]])
        row("host -> device (slots, scatter, ready)", name, t, DEV_COPY, "ok" if ok else "FAIL")

    # -- host <-> file: the FileTier's NIXL POSIX requests, and plain pwrite / preadv. Per
    # pattern a WRITE of host slots, checked against the file (os.pread), then a READ of those
    # file slots into other host slots, checked against the first ones.
    sync_note = " + fsync" if a.fsync else ""
    read_note = " (cold: fadvise DONTNEED)" if a.cold_reads else " (page cache)"
    pwrite_name, pread_name = "plain os.pwrite" + sync_note, "plain os.preadv" + read_note
    plain = np.resize(block.view(np.uint8).ravel(), nbytes)  # (not zeros: a compressing file system)
    back = np.empty_like(plain)

    def drop_cache(fd):
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def pwrite():
        t0 = time.perf_counter()
        mv, off = memoryview(plain), 0
        while off < nbytes:
            off += os.pwrite(plain_fd, mv[off:], off)
        if a.fsync:
            os.fsync(plain_fd)
        return {"total": time.perf_counter() - t0}

    def pread():
        if a.cold_reads:
            drop_cache(plain_fd)
        t0 = time.perf_counter()
        mv, off = memoryview(back), 0
        while off < nbytes:
            off += os.preadv(plain_fd, [mv[off:]], off)
        return {"total": time.perf_counter() - t0}

    row(pwrite_name, "contiguous", _timed(pwrite, repeats))
    row(pread_name, "contiguous", _timed(pread, repeats), verify="ok" if _same(back, plain) else "FAIL")
    B = storage.slot_bytes
    assert B == 2 * host.slot_bytes
    for name, p in pats.items():
        def h2f(p=p):
            t0 = time.perf_counter()
            h = storage.post("WRITE", p["host"], p["file"])
            t1 = time.perf_counter()
            assert storage.wait(h) == "DONE", "NIXL POSIX WRITE failed"
            t2 = time.perf_counter()
            if a.fsync:
                os.fsync(storage.fd)
            t3 = time.perf_counter()
            return {"total": t3 - t0, "post": t1 - t0, "wait": t2 - t1, **({"fsync": t3 - t2} if a.fsync else {})}

        def f2h(p=p):
            if a.cold_reads:
                drop_cache(storage.fd)
            t0 = time.perf_counter()
            h = storage.post("READ", p["host2"], p["file"])
            t1 = time.perf_counter()
            assert storage.wait(h) == "DONE", "NIXL POSIX READ failed"
            t2 = time.perf_counter()
            return {"total": t2 - t0, "post": t1 - t0, "wait": t2 - t1}

        t = _timed(h2f, repeats)
        ok = all(os.pread(storage.fd, B, s * B) == host.k[h].tobytes() + host.v[h].tobytes()
                 for h, s in zip(p["host"], p["file"]))
        row("host -> file (FileTier WRITE)" + sync_note, name, t, pwrite_name, "ok" if ok else "FAIL")
        for slot in p["host2"]:  # (so that a read that lands nothing fails the check)
            host.k[slot].fill(0)
            host.v[slot].fill(0)
        t = _timed(f2h, repeats)
        ok = _same(host.k[p["host2"]], host.k[p["host"]]) and _same(host.v[p["host2"]], host.v[p["host"]])
        row("file -> host (FileTier READ)" + read_note, name, t, pread_name, "ok" if ok else "FAIL")

    base = {r["path"]: r["GB_s"] for r in rows if not r["baseline"]}
    for r in rows:
        r["ratio"] = r["GB_s"] / base[r["baseline"]] if r["baseline"] else 1.0
        r["baseline"] = r["baseline"] or "(baseline)"
    storage.close()
    os.close(plain_fd)
    shutil.rmtree(os.path.join(workdir, "tier"), ignore_errors=True)  # (the disk is the workload's next)
    os.remove(plain_path)
    if not a.dir:
        shutil.rmtree(workdir, ignore_errors=True)
    info = {"page": dict(layers=L, page_size=S, kv_heads=KV, head_dim=Dh, dtype=dtype, page_KiB=page_bytes / 1024),
            "pool_pages": P, "host_slots": H, "file_slots": H, "repeats": repeats, "dir": workdir,
            "fs": _fs_type(workdir), "fsync": a.fsync, "cold_reads": a.cold_reads,
            "host_tier_pinned": False,  # (HostTier's arrays are plain numpy: pageable memory)
            "d2h_via_pinned_host": _pinned_host(pool.k.devices().pop())}
    return rows, info


# ---- part 2: the workload -----------------------------------------------------------------------


def start_server(args: list[str], log_dir: str, env: dict, timeout_s: float):
    import httpx

    from toolkit.disagg.control import free_port

    port = free_port()
    log = open(os.path.join(log_dir, f"unified-{port}.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "serve", "role=unified", f"server.port={port}", *args], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    url, t0 = f"http://127.0.0.1:{port}", time.time()
    while True:
        if proc.poll() is not None:
            with open(log.name) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"server exited (rc {proc.returncode}); see {log.name}:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log.name
        except httpx.HTTPError:
            pass
        if time.time() - t0 > timeout_s:
            proc.kill()
            raise TimeoutError(f"server not ready in {timeout_s} s; see {log.name}")
        time.sleep(0.5)


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def settings(setup: dict, storage_dir: str) -> list[tuple[str, list[str]]]:
    host, small = setup["host_pages"], setup["small_host_pages"]
    file = ["cache.storage=file", f"cache.storage_path={storage_dir}", f"cache.storage_gb={setup['storage_gb']}"]
    return [("none", ["cache=none"]),
            ("radix", ["cache=radix"]),
            ("radix+host", ["cache=radix", f"cache.host_pages={host}"]),
            ("radix+host+storage", ["cache=radix", f"cache.host_pages={host}", *file]),
            ("radix+small host+storage", ["cache=radix", f"cache.host_pages={small}", *file])]


def one_setting(name: str, args: list[str], setup: dict, log_dir: str, storage_dir: str) -> dict:
    import httpx

    from serve.metrics import unlabelled_samples
    from toolkit.bench.config import ServeBench
    from toolkit.bench.serve import run_load, summarize

    shutil.rmtree(storage_dir, ignore_errors=True)  # every run starts with empty storage
    proc, url, log = start_server([*setup["server"], *args], log_dir, setup["env"], setup["ready_timeout_s"])
    try:
        lcfg = ServeBench(url=url, workload="shared_prefix", logprobs=True, **setup["load"])
        results, wall = asyncio.run(run_load(lcfg))
        s = summarize(results, wall, lcfg)
        m = unlabelled_samples(httpx.get(url + "/metrics", timeout=30).text)
    finally:
        stop(proc)
        shutil.rmtree(storage_dir, ignore_errors=True)
    ok = [r for r in results if r.ok]
    g = lambda k: m.get(k, 0.0)  # noqa: E731
    hit, host_hit, storage_hit = g("prefix_cache_hit_tokens"), g("kv_host_hit_tokens"), g("kv_storage_hit_tokens")
    gauges = {"setting": name, "hit_tokens": int(hit), "device_hit_tokens": int(hit - host_hit - storage_hit),
              "host_hit_tokens": int(host_hit), "storage_hit_tokens": int(storage_hit),
              "evicted_pages": int(g("prefix_cache_evicted_pages")),
              "offloaded_host_MiB": g("kv_offloaded_bytes_host") / MIB,
              "offloaded_storage_MiB": g("kv_offloaded_bytes_storage") / MIB,
              "loaded_host_MiB": g("kv_loaded_bytes_host") / MIB,
              "loaded_storage_MiB": g("kv_loaded_bytes_storage") / MIB,
              "host_slots": f"{int(g('kv_host_slots_used'))}/{int(g('kv_host_slots'))}",
              "storage_slots": f"{int(g('kv_storage_slots_used'))}/{int(g('kv_storage_slots'))}",
              "copies_inflight": int(g("kv_copies_inflight")), "xla_compilations": int(g("xla_compilations"))}
    return {"setting": name, **{k: s[k] for k in LOAD_COLS if k in s},
            "ttft_avg_ms": float(np.mean([r.ttft for r in ok])) * 1e3 if ok else float("nan"),
            "ttfts": [r.ttft if r.ok else None for r in results], "prompt_tokens": [r.prompt_tokens for r in results],
            "errors": s["errors"], "gauges": gauges, "log": log}


def compare(rows: list[dict]) -> None:
    """Ratios against cache=none (latencies none / setting: > 1 is better) and the worst
    per-request TTFT slowdown (request i of the setting over request i of none)."""
    base, nan = rows[0], float("nan")
    for r in rows:
        if "ttfts" not in r:  # (the setting failed)
            continue
        for k in ("ttft_p50_ms", "ttft_avg_ms", "ttft_p99_ms"):
            r[k.replace("_ms", "_x")] = base.get(k, nan) / r[k] if r[k] else nan
        r["req_per_s_x"] = r["req_per_s"] / base["req_per_s"] if base.get("req_per_s") else nan
        pairs = [(t, b) for t, b in zip(r["ttfts"], base.get("ttfts", [])) if t is not None and b]
        r["worst_slowdown"] = max(t / b for t, b in pairs) if pairs else nan


def run_setting(name: str, args: list[str], setup: dict, log_dir: str, storage_dir: str) -> dict:
    """``one_setting``, or a row that says why it failed (the other settings still run)."""
    try:
        return one_setting(name, args, setup, log_dir, storage_dir)
    except Exception as e:  # noqa: BLE001 - a server that failed to start or crashed
        print(f"# {name} failed: {e}", file=sys.stderr, flush=True)
        return {"setting": name, "failed": "all", "errors": [f"{type(e).__name__}: {str(e)[:2000]}"],
                "gauges": {"setting": name}}


def workload(a, log_dir: str) -> tuple[list[dict], dict]:
    setup = LOAD["gpu" if a.gpu else "cpu"]
    setup = {**setup, "load": dict(setup["load"])}
    if a.requests:
        setup["load"]["num_requests"] = a.requests
    if a.prefix_words:
        setup["load"]["shared_prefix_len"] = a.prefix_words
    setup["load"]["num_prefixes"] = max(1, setup["load"]["num_requests"] // setup["load"]["turns"])
    base_dir = a.dir or tempfile.mkdtemp(prefix="kv-tiers-storage-")
    storage_dir = os.path.join(base_dir, "storage")
    chosen = settings(setup, storage_dir)
    if a.settings:
        want = a.settings.split(",")
        chosen = [s for s in chosen if s[0] in want or s[0] == "none"]
    rounds = a.rounds or setup["rounds"]
    for i in range(rounds):
        print(f"# workload round {i + 1}/{rounds}", file=sys.stderr, flush=True)
        rows = [run_setting(n, args, setup, log_dir, storage_dir) for n, args in chosen]
    if not a.dir:
        shutil.rmtree(base_dir, ignore_errors=True)
    compare(rows)
    # the working set: every conversation's last prompt (the last ``convs`` requests, one each)
    convs, ps = setup["load"]["num_prefixes"], _page_size(setup["server"])
    last = next((r["prompt_tokens"] for r in rows if "prompt_tokens" in r), [])[-convs:]
    pool = _arg(setup["server"], "engine.num_pages")
    ws_pages = sum(-(-t // ps) for t in last)
    info = {"load": setup["load"], "server": setup["server"], "host_pages": setup["host_pages"],
            "small_host_pages": setup["small_host_pages"], "storage_gb": setup["storage_gb"], "rounds": rounds,
            "working_set_tokens": sum(last), "working_set_pages": ws_pages, "device_pool_pages": pool,
            "working_set_x_pool": ws_pages / pool if pool else float("nan")}
    return rows, info


def _arg(server: list[str], key: str) -> int:
    vals = [int(s.split("=", 1)[1]) for s in server if s.startswith(key + "=")]
    return vals[-1] if vals else 0


def _page_size(server: list[str]) -> int:
    return _arg(server, "engine.page_size") or 16


# ---- main ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU sizes (8B-shaped pages; random-8b server)")
    ap.add_argument("--part", choices=["movement", "workload", "all"], default="all")
    ap.add_argument("--mib", type=int, default=0, help="movement: MiB per copy (0: the setup's, CPU 32, GPU 1024)")
    ap.add_argument("--layers", type=int, default=0, help="movement: layers of a page (0: the setup's, CPU 8, GPU 32)")
    ap.add_argument("--repeats", type=int, default=0, help="movement: timed repeats per path, median (0: the setup's)")
    ap.add_argument("--fsync", action="store_true", help="movement: fsync after each file write (tier and plain)")
    ap.add_argument("--cold-reads", action="store_true",
                    help="movement: evict the file's pages from the page cache before each read")
    ap.add_argument("--dir", default="", help="where the files go (default: a new temporary directory, removed)")
    ap.add_argument("--rounds", type=int, default=0, help="workload: rounds, the last reported (0: CPU 2, GPU 1)")
    ap.add_argument("--requests", type=int, default=0, help="workload: requests per setting (0: the setup's)")
    ap.add_argument("--prefix-words", type=int, default=0, help="workload: words per system prompt (0: the setup's)")
    ap.add_argument("--settings", default="", help="workload: comma-separated settings besides none (default: all)")
    ap.add_argument("--log-dir", default="", help="workload: server logs (default: a temporary directory)")
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()
    out: dict = {}
    if a.part in ("movement", "all"):
        rows, info = movement(a)
        print(core.card_line(core.device_card()))
        print(f"## Movement: {info['page']}, pool {info['pool_pages']} pages, host and file {info['host_slots']} "
              f"slots, median of {info['repeats']}; files in {info['dir']} on {info['fs']}; "
              f"fsync {'on' if a.fsync else 'off'}, reads {'cold' if a.cold_reads else 'from the page cache'}; "
              f"d2h via pinned host {info['d2h_via_pinned_host']}; GB/s counts each byte once; detail in ms")
        print("\n".join(core.format_table(rows, MOVE_COLS)))
        out["movement"] = {"rows": rows, "info": info}
    if a.part in ("workload", "all"):
        log_dir = a.log_dir or tempfile.mkdtemp(prefix="kv-tiers-logs-")
        rows, info = workload(a, log_dir)
        print(f"\n## Workload: {json.dumps(info['load'])}\n# server: {' '.join(info['server'])}; host "
              f"{info['host_pages']} pages (small host {info['small_host_pages']}), storage {info['storage_gb']} GiB; "
              f"working set {info['working_set_tokens']} tokens = {info['working_set_pages']} pages = "
              f"{info['working_set_x_pool']:.1f}x the device pool ({info['device_pool_pages']} pages); "
              f"round {info['rounds']} of {info['rounds']}; logs in {log_dir}")
        print("\n".join(core.format_table([r["gauges"] for r in rows], GAUGE_COLS)))
        print("(tokens from the server's /metrics: hit = prefix_cache_hit_tokens, of which host and storage = "
              "kv_host_hit_tokens, kv_storage_hit_tokens; MiB: kv_offloaded_bytes_*, kv_loaded_bytes_*; "
              "slots: used/all)\n")
        print("\n".join(core.format_table(rows, LOAD_COLS)))
        print("(*_x: none / setting for TTFT, setting / none for req/s: > 1 is better; worst_slowdown: max over "
              "requests of TTFT setting / TTFT none, the same request in both runs)")
        for r in rows:
            if r.get("errors"):
                print(f"# {r['setting']} errors: {r['errors']}")
        out["workload"] = {"rows": [{k: v for k, v in r.items()} for r in rows], "info": info}
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
