"""The main job: load the configured model, generate for one prompt.

    python -m toolkit.run prompt="What is the capital of France?"
    python -m toolkit.run prompt="..." chat=false max_new_tokens=32 temperature=0

stdout gets only the generated text (streamed); statistics and logs go to stderr.
"""

from __future__ import annotations

import sys
import time

from toolkit.cli import hydra_main
from toolkit.config.validate import validate


def sampling_from(cfg):
    from toolkit.engine.request import SamplingParams

    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed, stop=list(cfg.stop))


def build_engine(cfg):
    """Validate the whole config, then build the engine (load, then allocate)."""
    from toolkit.engine.engine import Engine

    validate(cfg)
    return Engine.from_config(cfg.model, cfg.engine, cache=cfg.cache)


def pd_job(cfg) -> None:
    """The same job served disaggregated: a prefill engine writes the prompt's KV into a
    decode engine's pages (both in this process), the decode engine generates."""
    from toolkit.disagg.pair import PDPair
    from toolkit.engine.engine import resolve_dtype
    from toolkit.models.loader import load_checkpoint

    validate(cfg)
    pair = PDPair(load_checkpoint(cfg.model), cfg.engine, cfg.transfer, resolve_dtype(cfg.model.dtype),
                  prefill_cache=cfg.cache, decode_cache=cfg.cache)
    eng = pair.decode.engine
    prompt = eng.chat_prompt(cfg.prompt, cfg.system) if cfg.chat else cfg.prompt
    t0 = time.perf_counter()
    r = pair.submit(eng.tokenizer.encode(prompt), sampling_from(cfg),
                    on_token=lambda s, t, d: (sys.stdout.write(d), sys.stdout.flush()))
    while not r.over:
        pair.step()
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    sys.stdout.flush()
    if r.error:
        print(f"request failed: {r.error}", file=sys.stderr)
        sys.exit(1)
    pr = pair.prefill.rooms[r.room]
    xfer_ms = sum(max(done - posted, 0.0) for posted, done, _ in pr.transfers) * 1e3
    print(f"[stats] disagg transfer={cfg.transfer.backend} prompt_tokens={len(r.prompt_ids)} "
          f"generated_tokens={len(r.seq.output_ids)} transfers={len(pr.transfers)} "
          f"kv_bytes={pair.prefill.stats['transfer_bytes']} transfer_ms={xfer_ms:.1f} total={dt:.2f}s "
          f"states={' > '.join(s for _, s in pr.history)} finish={r.seq.finish_reason}", file=sys.stderr)
    pair.close()


def main_job(cfg) -> None:
    if cfg.disagg:
        return pd_job(cfg)
    engine = build_engine(cfg)
    prompt = engine.chat_prompt(cfg.prompt, cfg.system) if cfg.chat else cfg.prompt
    params = sampling_from(cfg)
    t0 = time.perf_counter()
    seq = engine.add_request(prompt, params, on_token=lambda s, t, d: (sys.stdout.write(d), sys.stdout.flush())
                             if cfg.stream else None)
    engine.run_until_done()
    dt = time.perf_counter() - t0
    if not cfg.stream:
        sys.stdout.write(seq.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    n, ttft = len(seq.output_ids), seq.first_token_time - seq.arrival_time
    # Time spent compiling new shapes is reported apart from the generation rate.
    compile_s = engine.stats().compile_seconds
    rate = n / max(dt - compile_s, 1e-9)
    print(f"[stats] prompt_tokens={len(seq.prompt_ids)} generated_tokens={n} "
          f"ttft={ttft * 1000:.1f}ms tokens/s={rate:.1f} total={dt:.2f}s "
          f"(compile {compile_s:.2f}s, {engine.num_compilations} compilations) finish={seq.finish_reason}",
          file=sys.stderr)


main = hydra_main(main_job)


if __name__ == "__main__":
    main()
