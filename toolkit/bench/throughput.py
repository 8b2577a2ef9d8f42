"""Throughput benchmark: prompt and decode tokens/s of a real model at several batch sizes.

    python -m toolkit.bench.throughput                                  # default model, batch 1, 8, 32
    python -m toolkit.bench.throughput engine=gpu "bench.batch_sizes=[1,8,32,64]"
    python -m toolkit.bench.throughput -m engine.overlap_schedule=true,false   # one JSON per run

For each batch size, B random prompts of bench.prompt_len tokens are prefilled together
(time until every request has its first token), then decoded for bench.decode_steps steps.
A warm-up round with the same shapes runs first so compilation stays out of the numbers;
each number is the median of bench.repeats rounds.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time

import numpy as np
from tqdm import tqdm

from toolkit.bench import config, core
from toolkit.cli import hydra_main

config.register()
COLS = ["batch", "prompt_len", "prompt_tok_s", "decode_tok_s", "decode_step_ms", "compilations"]


def _round(engine, B: int, prompt_len: int, steps: int, rng) -> tuple[float, float, float]:
    """One round: (prompt tok/s, decode tok/s, seconds per decode step)."""
    from toolkit.engine.request import SamplingParams

    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    seqs = [engine.add_request(list(rng.integers(10, engine.args.vocab_size - 10, prompt_len)), params)
            for _ in range(B)]
    t0 = time.perf_counter()
    while any(not s.output_ids for s in seqs):
        engine.step()
    t1 = time.perf_counter()
    n0 = sum(len(s.output_ids) for s in seqs)
    engine.run_until_done()  # the engine retires finished requests itself
    t2 = time.perf_counter()
    decoded = sum(len(s.output_ids) for s in seqs) - n0
    return B * prompt_len / (t1 - t0), decoded / (t2 - t1), (t2 - t1) / max(steps, 1)


def run_bench(cfg: config.ThroughputRun) -> list[dict]:
    from toolkit.config import validate as V
    from toolkit.engine.engine import Engine, resolve_dtype
    from toolkit.models.loader import load_checkpoint

    V.validate_model(cfg.model)
    V.validate_engine(cfg.engine)
    b = cfg.bench
    ckpt = load_checkpoint(cfg.model)
    rows = []
    for B in tqdm(b.batch_sizes, desc="batch sizes", file=sys.stderr):
        ecfg = dataclasses.replace(cfg.engine, max_batch_size=max(cfg.engine.max_batch_size, B),
                                   interleave_decode=False)
        engine = Engine(ckpt, ecfg, resolve_dtype(cfg.model.dtype), cache=cfg.cache)
        rng = np.random.default_rng(0)
        for _ in range(b.warmup):
            _round(engine, B, b.prompt_len, b.decode_steps, rng)
        runs = [_round(engine, B, b.prompt_len, b.decode_steps, rng) for _ in range(b.repeats)]
        p, d, st = (float(np.median(x)) for x in zip(*runs))
        stats = engine.stats()
        assert stats.idle, f"requests or pages left behind: {stats}"
        rows.append(dict(batch=B, prompt_len=b.prompt_len, prompt_tok_s=p, decode_tok_s=d,
                         decode_step_ms=st * 1e3, compilations=stats.num_compilations))
        del engine
        gc.collect()  # the pool (cuda_malloc on a GPU) is freed only once its cycle is collected
    return rows


def job(cfg: config.ThroughputRun) -> None:
    rows = run_bench(cfg)
    core.report("throughput", rows, COLS, card=core.device_card(model=cfg.model.name, dtype=cfg.model.dtype),
                config=cfg, json_out=cfg.bench.json_out,
                title="Engine throughput: prompt tok/s until every first token, decode tok/s after")



main = hydra_main(job, config_name="bench/throughput")

if __name__ == "__main__":
    main()
