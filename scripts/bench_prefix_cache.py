"""The multi-turn shared-prefix workload through router + prefill + decode processes, with
every worker's prefix cache off (baseline) and on (cache=radix), in one run.

    python scripts/bench_prefix_cache.py                       # CPU, tiny random model, scaled down
    python scripts/bench_prefix_cache.py --gpu                 # one GPU, random-8b, long prefixes

Prints one row per setting (the load generator's numbers, the decode worker's mean batch
size, the fraction of prompt tokens served from a cache, the prompt tokens each worker
found cached and the KV bytes prefill moved) and the ratios radix / baseline.
Each setting starts its own worker processes and stops them; the last of ``--rounds``
rounds is reported, so neither setting pays for compiling its step shapes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from serve.metrics import unlabelled_samples  # noqa: E402
from toolkit.bench.config import ServeBench  # noqa: E402
from toolkit.bench.serve import run_load, summarize  # noqa: E402
from toolkit.disagg.control import free_port  # noqa: E402

CPU = dict(model=["model=tiny-random", "engine.page_size=4", "engine.chunk_size=64", "engine.num_pages=2048",
                  "engine.max_batch_size=16", "engine.max_model_len=2048", "engine.min_bucket=4"],
           load=dict(num_requests=48, concurrency=8, num_prefixes=3, shared_prefix_len=120, input_len=8,
                     output_len=16, turns=4), block=4)
# Two workers share one GPU: each gets a quarter of it for XLA (weights, activations) and a
# pool from what is left (prefill 0.25, decode 0.5 of the free memory it sees). ~1350 words
# of the byte-level tokenizer are ~8K tokens (``--prefix-words``, 2700: ~16K).
GPU = dict(model=["engine=gpu", "model=random-8b", "engine.max_model_len=20480", "engine.chunk_size=2048"],
           load=dict(num_requests=64, concurrency=16, num_prefixes=4, shared_prefix_len=1350, input_len=40,
                     output_len=128, turns=4), block=16,
           env={"prefill": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.25"}, "decode": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.25"},
                "router": {"JAX_PLATFORMS": "cpu"}},
           role_args={"prefill": ["engine.memory_fraction=0.25"], "decode": ["engine.memory_fraction=0.5"]})
COLS = ["cache", "requests", "failed", "req_per_s", "output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms",
        "tpot_avg_ms", "itl_avg_ms", "decode_batch", "e2e_p50_ms", "cached_fraction", "prefill_hit_tokens",
        "decode_hit_tokens", "kv_mib_moved"]


def start(role: str, args: list[str], log_dir: str, setup: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(os.path.join(log_dir, f"{role}-{port}.log"), "w")
    transfer = ["transfer=nixl"] if role in ("prefill", "decode") else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **setup.get("env", {}).get(role, {})}
    proc = subprocess.Popen([sys.executable, "-m", "serve", f"role={role}", f"server.port={port}", *transfer, *args,
                             *setup.get("role_args", {}).get(role, [])],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{role} exited; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() - t0 > 1800:
            raise TimeoutError(f"{role} not ready")
        time.sleep(0.5)


async def load_and_batch(lcfg: ServeBench, decode_url: str) -> tuple[list, float, float]:
    """The load, and beside it the decode worker's batch size (its engine's running requests,
    sampled from /metrics every 0.2 s; the mean of the nonzero samples): ITL means little
    without the batch it was measured at."""
    samples: list[float] = []

    async def sample():
        async with httpx.AsyncClient(timeout=10) as c:
            while True:
                m = unlabelled_samples((await c.get(decode_url + "/metrics")).text)
                samples.append(m.get("engine_running_requests", 0.0))
                await asyncio.sleep(0.2)

    task = asyncio.create_task(sample())
    try:
        results, wall = await run_load(lcfg)
    finally:
        task.cancel()
    busy = [x for x in samples if x > 0]
    return results, wall, sum(busy) / len(busy) if busy else 0.0


def one_setting(cache: str, setup: dict, log_dir: str) -> dict:
    procs = []
    try:
        pre, pre_url = start("prefill", [f"cache={cache}", *setup["model"]], log_dir, setup)
        procs.append(pre)
        dec, dec_url = start("decode", [f"cache={cache}", *setup["model"]], log_dir, setup)
        procs.append(dec)
        router, url = start("router", [*setup["model"], f"role.prefill_urls=[{pre_url}]",
                                       f"role.decode_urls=[{dec_url}]", "role.policy=cache_aware",
                                       f"role.cache_aware_block={setup['block']}"], log_dir, setup)
        procs.append(router)
        lcfg = ServeBench(url=url, workload="shared_prefix", logprobs=True, **setup["load"])
        results, wall, batch = asyncio.run(load_and_batch(lcfg, dec_url))
        s = summarize(results, wall, lcfg)
        pm = unlabelled_samples(httpx.get(pre_url + "/metrics").text)
        dm = unlabelled_samples(httpx.get(dec_url + "/metrics").text)
        moved = httpx.get(pre_url + "/pd/stats").json().get("transfer_bytes", 0)
        return {"cache": cache, **{k: s[k] for k in COLS if k in s}, "decode_batch": batch,
                "prefill_hit_tokens": int(pm.get("prefix_cache_hit_tokens", 0)),
                "decode_hit_tokens": int(dm.get("prefix_cache_hit_tokens", 0)), "kv_mib_moved": moved / 2**20}
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="the GPU setup (random-8b, long prefixes)")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--rounds", type=int, default=2,
                    help="run the pair of settings this many times, report the last round: the first "
                         "compiles each setting's step shapes into the compile cache (CPU: no warm-up)")
    ap.add_argument("--prefix-words", type=int, default=0, help="words per shared prefix (0: the setup's)")
    ap.add_argument("--requests", type=int, default=0, help="requests per setting (0: the setup's)")
    a = ap.parse_args()
    setup = GPU if a.gpu else CPU
    if a.prefix_words:
        setup["load"]["shared_prefix_len"] = a.prefix_words
    if a.requests:
        setup["load"]["num_requests"] = a.requests
    for _ in range(a.rounds):
        rows = [one_setting(c, setup, a.log_dir) for c in ("none", "radix")]
    base, rad = rows
    ratio = {"cache": "radix / none"}
    for k in ("req_per_s", "output_tok_per_s"):
        ratio[k] = rad[k] / base[k]
    for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_avg_ms", "itl_avg_ms", "e2e_p50_ms", "kv_mib_moved"):
        ratio[k] = base[k] / rad[k] if rad[k] else float("inf")  # > 1: radix is better
    print("| " + " | ".join(COLS) + " |")
    print("|" + "---|" * len(COLS))
    for r in rows + [ratio]:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                for k in COLS) + " |")
    print(f"(ratios: throughput radix/none; latencies and bytes none/radix, so > 1 is better)\n"
          f"load: {json.dumps(setup['load'])}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"rows": rows, "ratio": ratio, "setup": {k: v for k, v in setup.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
