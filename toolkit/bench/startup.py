"""Start-up benchmark: what a worker compiles before it is ready, and how long it takes.

    # in this process: warm up an engine, one row per step shape (trace, lower, XLA seconds)
    python -m toolkit.bench.startup bench.mode=compile engine=gpu model=tiny-random
    # real servers: time to ready with an empty compile cache (cold), then with it filled (warm),
    # then the load generator against the warm one (compilations during the load: 0 expected)
    python -m toolkit.bench.startup bench.mode=serve "bench.server_args=[engine=gpu,model=tiny-random]" \\
        bench.load.num_requests=256 bench.load.concurrency=64

``compile`` answers "where does a shape's compile time go" (give it
``engine.compile_threads=1`` for rows that are one shape each): tracing the model to a jaxpr,
lowering it to StableHLO (the Pallas kernels are lowered here: Triton and Mosaic GPU
modules are built at this stage), and XLA's compilation (fusion, autotuning, kernel
compilation). ``serve`` starts ``python -m serve`` as a user would, polls ``/health``
until it answers 200, and reads ``/metrics`` (step shapes, XLA compilations and cache
loads, step shapes loaded from the engine's store); each run gets the cache directory ``bench.cache_dir`` (emptied first for cold).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

from toolkit.bench import config, core
from toolkit.cli import hydra_main

config.register()
COMPILE_COLS = ["shape", "seconds", "trace_s", "lower_s", "xla_s", "loaded"]
SERVE_COLS = ["run", "ready_s", "step_shapes", "step_loaded", "xla_compiled", "xla_loaded", "load_compilations",
              "concurrency", "requests", "failed", "req_per_s", "output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_avg_ms", "itl_avg_ms", "itl_p99_ms"]


def compile_rows(cfg) -> list[dict]:
    from toolkit.config import validate as V
    from toolkit.engine import compile_cache
    from toolkit.engine.engine import Engine

    V.validate_model(cfg.model)
    V.validate_engine(cfg.engine)
    engine = Engine.from_config(cfg.model, cfg.engine)
    shapes = engine.bucket_set()
    rows, last = [], [compile_cache.counts(), time.perf_counter()]

    def progress(done: int, total: int) -> None:
        c, t = compile_cache.counts(), time.perf_counter()
        p = last[0]
        rows.append(dict(shape=shapes[done - 1], seconds=t - last[1], trace_s=c.trace_seconds - p.trace_seconds,
                         lower_s=c.lower_seconds - p.lower_seconds, xla_s=c.seconds - p.seconds,
                         loaded=c.loaded - p.loaded))
        last[:] = [c, t]

    rep = engine.warmup(force=True, on_progress=progress)
    rows.append(dict(shape=f"all {rep.shapes}", seconds=rep.seconds, trace_s=sum(r["trace_s"] for r in rows),
                     lower_s=sum(r["lower_s"] for r in rows), xla_s=sum(r["xla_s"] for r in rows),
                     loaded=rep.loaded))
    return rows


def _metrics(url: str) -> dict[str, float]:
    import httpx

    from serve.metrics import unlabelled_samples

    return unlabelled_samples(httpx.get(url + "/metrics", timeout=10).text)


def _serve_run(b, label: str, cache_dir: str, port: int, load: bool) -> list[dict]:
    """Start the server, time it to ready, read /metrics; with ``load``, run the load once
    per concurrency against it. One row for the start, one per load."""
    import httpx

    cmd = [sys.executable, "-m", "serve", *b.server_args, f"server.port={port}",
           f"engine.compile_cache_dir={cache_dir}"]
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
            if time.perf_counter() - t0 > b.ready_timeout_s:
                raise TimeoutError(f"not ready within {b.ready_timeout_s} s")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        row = dict(run=label, ready_s=time.perf_counter() - t0)
        m = _metrics(url)
        row.update(step_shapes=int(m["step_shapes"]), xla_compiled=int(m["xla_compilations"]),
                   xla_loaded=int(m["xla_cache_loads"]), step_loaded=int(m["step_executables_loaded"]))
        rows = [row]
        for conc in (b.load_concurrency or [b.load.concurrency]) if load else []:
            import asyncio

            from toolkit.bench.serve import run_load, summarize

            lcfg = dataclasses.replace(b.load, url=url, concurrency=conc)
            before = _metrics(url)["step_compilations"]
            results, wall = asyncio.run(run_load(lcfg))
            s = summarize(results, wall, lcfg)
            after = _metrics(url)["step_compilations"]
            rows.append({"run": f"{label} + load x{conc}", **{k: s[k] for k in SERVE_COLS if k in s},
                         "load_compilations": int(after - before)})
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve_rows(b) -> list[dict]:
    cache_dir = b.cache_dir or tempfile.mkdtemp(prefix="jax-pd-startup-")
    shutil.rmtree(cache_dir, ignore_errors=True)  # cold: nothing cached
    os.makedirs(cache_dir)
    rows = _serve_run(b, "cold", cache_dir, b.port, load=False)
    for i in range(b.warm_runs):
        rows += _serve_run(b, "warm", cache_dir, b.port, load=b.load.num_requests > 0 and i == b.warm_runs - 1)
    return rows


def job(cfg: config.StartupRun) -> None:
    b = cfg.bench
    if b.mode == "compile":
        rows, cols, title = compile_rows(cfg), COMPILE_COLS, "Warm-up: every step shape of the bucket set"
        card = core.device_card(model=cfg.model.name)
    elif b.mode == "serve":
        rows, cols, title = serve_rows(b), SERVE_COLS, "Server start-up: time to /health 200, cold and warm cache"
        card = core.device_card(server=" ".join(b.server_args))
    else:
        from toolkit.config.validate import ConfigError

        raise ConfigError(f"bench.mode={b.mode!r}; allowed: compile, serve")
    core.report("startup", rows, cols, card=card, config=cfg, json_out=b.json_out, title=title)


main = hydra_main(job, config_name="bench/startup")

if __name__ == "__main__":
    main()
