"""Throughput benchmark: prompt and decode tokens/s at several batch sizes.

    python -m toolkit.bench                          # default model, batch sizes 1, 8, 32
    python -m toolkit.bench engine=gpu bench.batch_sizes=[1,8,32,64]

For each batch size, B random prompts of bench.prompt_len tokens are prefilled
together (time until every request has its first token), then decoded for
bench.decode_steps steps. A warm-up round with the same shapes runs first so
compilation stays out of the numbers. Prints a table; bench.json_out saves JSON.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from toolkit import logs
from toolkit.config import schema

schema.register()


def _round(engine, B, prompt_len, steps, rng):
    from toolkit.engine.request import SamplingParams

    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    seqs = [engine.add_request(list(rng.integers(10, engine.args.vocab_size - 10, prompt_len)), params)
            for _ in range(B)]
    t0 = time.perf_counter()
    while any(not s.output_ids for s in seqs):
        engine.step()
    t1 = time.perf_counter()
    n0 = sum(len(s.output_ids) for s in seqs)
    engine.run_until_done()
    t2 = time.perf_counter()
    decoded = sum(len(s.output_ids) for s in seqs) - n0
    for s in seqs:
        engine.seqs.pop(s.request_id, None)
    return B * prompt_len / (t1 - t0), decoded / (t2 - t1), (t2 - t1) / max(steps, 1)


def run_bench(cfg) -> list[dict]:
    from toolkit.engine.engine import Engine
    from toolkit.models.loader import load_checkpoint
    from toolkit.config.validate import validate
    from toolkit.engine.engine import resolve_dtype

    validate(cfg)
    b = cfg.bench
    ckpt = load_checkpoint(cfg.model)
    rows = []
    for B in tqdm(b.batch_sizes, desc="batch sizes", file=sys.stderr):
        ecfg = dataclasses.replace(cfg.engine, max_batch_size=max(cfg.engine.max_batch_size, B),
                                   interleave_decode=False)
        engine = Engine(ckpt, ecfg, resolve_dtype(cfg.model.dtype))
        rng = np.random.default_rng(0)
        for _ in range(b.warmup):
            _round(engine, B, b.prompt_len, b.decode_steps, rng)
        runs = [_round(engine, B, b.prompt_len, b.decode_steps, rng) for _ in range(b.repeats)]
        p, d, st = (float(np.median(x)) for x in zip(*runs))
        rows.append(dict(batch=B, prompt_len=b.prompt_len, prompt_tok_s=p, decode_tok_s=d,
                         decode_step_ms=st * 1e3, compilations=engine.num_compilations))
        del engine
        gc.collect()  # the pool (cuda_malloc on a GPU) is freed only once its cycle is collected
    return rows


def print_table(rows, model_name, device) -> None:
    print(f"model={model_name} device={device}")
    print(f"{'batch':>6} {'prompt_len':>10} {'prompt tok/s':>13} {'decode tok/s':>13} {'step ms':>8} {'compiles':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['prompt_len']:>10} {r['prompt_tok_s']:>13.1f} {r['decode_tok_s']:>13.1f} "
              f"{r['decode_step_ms']:>8.2f} {r['compilations']:>8}")


@hydra.main(version_base=None, config_path="../conf", config_name="run")
def main(cfg: DictConfig) -> None:
    import jax

    logs.setup()
    cfg = OmegaConf.to_object(cfg)
    rows = run_bench(cfg)
    print_table(rows, cfg.model.name, jax.devices()[0].device_kind)
    if cfg.bench.json_out:
        with open(cfg.bench.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
