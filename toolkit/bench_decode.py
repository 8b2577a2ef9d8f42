"""End-to-end decode benchmark against the memory roofline (kernels issue).

    python3 -m toolkit.bench_decode                       # Llama-3-8B shape, GPU
    python3 -m toolkit.bench_decode --small --batch 1 4   # tiny shape, CPU smoke run

A Llama-3-8B-shaped model with random bf16 weights (made on the device, no download)
runs in the engine. For each batch size B, B random prompts of --ctx tokens are
prefilled, then --steps decode steps are timed. The roofline of one decode step is the
bytes it must read (every weight once, plus each sequence's K/V) over the copy bandwidth
measured in the same run (the best of an XLA and a torch copy, as in kernels.bench_attention).
The device time of one step is measured by issuing the jitted
step back to back with the same inputs (the device never waits for the host); the host
overhead is the engine's step time minus that (time the device sits idle between steps:
scheduling, input building, dispatch, reading back sampled tokens). Each backend runs in
both engine modes: ``overlap`` (step N+1 launched before step N's tokens are read, the
default) and ``lockstep``. Prints a table last.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from kernels.bench_attention import copy_ceilings
from toolkit.config.schema import EngineConfig
from toolkit.engine.buckets import bucket
from toolkit.engine.engine import Engine
from toolkit.engine.request import SamplingParams
from toolkit.models.checkpoint import Checkpoint
from toolkit.models.random_init import byte_tokenizer
from toolkit.models.spec import ModelArgs, check_weights

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=8192)
SMALL = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
             num_kv_heads=2, head_dim=32, tie_word_embeddings=False, max_position_embeddings=4096)


def device_random_checkpoint(args: ModelArgs, dtype, seed: int = 0) -> Checkpoint:
    """Random weights made directly on the device in ``dtype`` (an 8B model in seconds),
    scaled like a trained model (std 1/sqrt(fan_in))."""
    key = iter(jax.random.split(jax.random.key(seed), 16))
    L, D, F, V = args.num_layers, args.hidden_size, args.intermediate_size, args.vocab_size
    qd, kd = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim

    def normal(*shape, std=None):
        std = shape[-2] ** -0.5 if std is None else std
        return (jax.random.normal(next(key), shape, dtype) * jnp.asarray(std, dtype)).astype(dtype)

    ones = lambda *shape: jnp.ones(shape, dtype)  # noqa: E731
    w = {"embed": normal(V, D, std=1.0), "final_norm": ones(D), "attn_norm": ones(L, D),
         "wq": normal(L, D, qd), "wk": normal(L, D, kd), "wv": normal(L, D, kd), "wo": normal(L, qd, D),
         "mlp_norm": ones(L, D), "w_gate": normal(L, D, F), "w_up": normal(L, D, F), "w_down": normal(L, F, D)}
    if not args.tie_word_embeddings:
        w["lm_head"] = normal(D, V)
    check_weights(args, w)
    return Checkpoint(args=args, weights=w, tokenizer=byte_tokenizer())


def step_bytes(args: ModelArgs, weights: dict, B: int, ctx: int, itemsize: int) -> int:
    """Bytes one decode step must read: every weight once (the embedding table only for
    the B rows it looks up) plus each sequence's K and V in every layer."""
    w = sum(int(x.size) for k, x in weights.items() if k != "embed") * itemsize
    w += B * args.hidden_size * itemsize
    kv = 2 * B * ctx * args.num_layers * args.num_kv_heads * args.head_dim * itemsize
    return w + kv


LEAD = 64  # most warm-up steps (prefill chunks interleaved with decode steps)
TRACE_COLS = ("trace_busy_ms", "trace_idle_ms", "replay_trace_busy_ms", "replay_trace_idle_ms")


def device_timeline(trace_dir: str, num_steps: int) -> dict:
    """Busy and idle time of the GPU per engine step, from a profiler trace of ``num_steps``
    steps: the union of kernel intervals on the device's streams over the traced window."""
    import glob
    from collections import Counter

    from jax.profiler import ProfileData

    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    spans, by_name = [], Counter()
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            evs = [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events]
            print(f"trace: {plane.name} / {line.name}: {len(evs)} events", file=sys.stderr)
            if line.name.startswith("Stream"):
                spans += evs
                for a, b, name in evs:
                    by_name[name[:60]] += b - a
    if not spans:
        return {}
    spans.sort()
    busy, (cur_a, cur_b) = 0, spans[0][:2]
    for a, b, _ in spans[1:]:
        if a > cur_b:
            busy, cur_a, cur_b = busy + cur_b - cur_a, a, b
        else:
            cur_b = max(cur_b, b)
    busy += cur_b - cur_a
    window = max(b for _, b, _ in spans) - spans[0][0]
    top = ", ".join(f"{n} {t / num_steps / 1e6:.3f}" for n, t in by_name.most_common(6))
    print(f"trace: top kernels (ms per step): {top}", file=sys.stderr)
    return dict(trace_busy_ms=busy / num_steps / 1e6, trace_idle_ms=(window - busy) / num_steps / 1e6)


def traced_timeline(body, num_steps: int) -> dict:
    """Run ``body`` (num_steps steps, synced at the end) under the JAX profiler."""
    tdir = tempfile.mkdtemp()
    jax.profiler.start_trace(tdir)
    try:
        body()
    finally:
        jax.profiler.stop_trace()
    return device_timeline(tdir, num_steps)


def run(args: ModelArgs, ckpt: Checkpoint, backend: str, batches, ctx: int, steps: int, dtype, bw: float,
        page_size: int = 16, overlap: bool = True, profile: bool = False, trace_steps: int = 0) -> list[dict]:
    maxB = max(batches)
    # Requests prefilled early run ahead of the last ones by the warm-up steps (< LEAD):
    # each can take LEAD + steps tokens, so no request finishes while steps are timed.
    most_new = LEAD + steps + trace_steps
    pages = maxB * -(-(ctx + most_new + 8) // page_size) + 8
    ecfg = EngineConfig(page_size=page_size, num_pages=pages, memory_fraction=0.0, max_batch_size=maxB,
                        chunk_size=min(8192, maxB * ctx), max_prefill_seqs=16, max_model_len=ctx + most_new + 16,
                        min_bucket=1, attention_backend=backend, overlap_schedule=overlap)
    eng = Engine(ckpt, ecfg, dtype)
    runner = eng.runner
    last = {}
    orig_fn = runner._fn

    def spy(*a, **kw):  # remember the last decode step's inputs for the device-only timing
        if kw.get("max_q_len") == 1:
            last["args"], last["kw"] = a, kw
        return orig_fn(*a, **kw)

    runner._fn = spy
    spent: dict[str, float] = {}

    def timed(obj, name):  # wall time of the host-side parts of a step
        fn = getattr(obj, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        setattr(obj, name, wrapper)

    timed(eng.scheduler, "schedule")
    timed(runner, "_prepare")
    timed(runner, "launch")
    timed(runner, "collect")
    rng = np.random.default_rng(0)
    rows = []
    mode = "overlap" if overlap else "lockstep"
    for B in tqdm(batches, desc=f"{backend}, {mode}: batch sizes", file=sys.stderr):
        params = SamplingParams(max_new_tokens=most_new, ignore_eos=True)
        seqs = [eng.add_request(list(rng.integers(300, args.vocab_size - 10, ctx)), params) for _ in range(B)]
        warmup = 0
        while any(len(s.output_ids) < 2 for s in seqs):  # prefill, plus one decode step to compile
            eng.step()
            warmup += 1
        assert warmup < LEAD, f"warm-up took {warmup} steps"
        ctx0 = np.mean([s.num_computed for s in seqs])
        last.clear()
        comp0 = orig_fn._cache_size()
        spent.clear()
        times = []
        prof = cProfile.Profile() if profile and B == max(batches) else None
        if prof:
            prof.enable()
        with jax.log_compiles(True):  # any compile here is a bug in the shape bucketing
            for _ in range(steps):
                t0 = time.perf_counter()
                eng.step()
                times.append(time.perf_counter() - t0)
        if prof:
            prof.disable()
            print(f"--- host profile, {backend} {mode} B={B}, {steps} steps", file=sys.stderr)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
        parts = {k: v / steps * 1e3 for k, v in spent.items()}
        ctx_mean = (ctx0 + np.mean([s.num_computed for s in seqs])) / 2
        timed_call = dict(last)  # the last timed step: every request in it
        assert timed_call["args"][3].kv_lens.shape[0] == bucket(B, runner.batch_buckets)
        assert all(not s.is_finished for s in seqs), "a request finished while steps were timed"
        traced = {}
        if trace_steps:  # after the timed steps: the profiler slows the host (no GPU plane on CPU)
            def engine_steps():
                for _ in range(trace_steps):
                    eng.step()
                eng.sync()
            traced = traced_timeline(engine_steps, trace_steps)
        for s in seqs:
            eng.abort(s.request_id)
            eng.seqs.pop(s.request_id, None)
        eng.sync()
        step_s = float(np.median(times))
        # Device-only: the same jitted decode step issued back to back, pool threaded through.
        a, kw = timed_call["args"], timed_call["kw"]
        state, _, _, inp, samp, feed, prev_tok = a  # (its pools were donated: use the live ones)
        kp, vp = runner.pool.k, runner.pool.v
        n = 10
        for rep in range(2):
            t0, disp = time.perf_counter(), 0.0
            for _ in range(n):
                t1 = time.perf_counter()
                tok, _, kp, vp = orig_fn(state, kp, vp, inp, samp, feed, prev_tok, **kw)
                disp += time.perf_counter() - t1  # host time until the call returns
            jax.block_until_ready(tok)
            dev_s = (time.perf_counter() - t0) / n
        # The same call waited on every time (what the engine does, minus its host work).
        t0 = time.perf_counter()
        for _ in range(n):
            tok, lp, kp, vp = orig_fn(state, kp, vp, inp, samp, feed, prev_tok, **kw)
            jax.device_get((tok, lp))
        synced_s = (time.perf_counter() - t0) / n
        # Pipelined as the overlapped engine does (call N+1, then read N's tokens), with
        # the next call's tokens fed from the previous call's samples on the device.
        feed_all = np.arange(inp.tokens.shape[0], dtype=np.int32)
        prev = orig_fn(state, kp, vp, inp, samp, feed_all, prev_tok, **kw)
        kp, vp = prev[2], prev[3]
        t0 = time.perf_counter()
        for _ in range(n):
            cur = orig_fn(state, kp, vp, inp, samp, feed_all, prev[0], **kw)
            kp, vp = cur[2], cur[3]
            jax.device_get((prev[0], prev[1]))
            prev = cur
        jax.device_get(prev[:2])
        pipelined_s = (time.perf_counter() - t0) / n
        if trace_steps:  # the replay's device time under the same profiler as the engine's
            def replay():
                nonlocal kp, vp
                for _ in range(n):
                    tok, _, kp, vp = orig_fn(state, kp, vp, inp, samp, feed, prev_tok, **kw)
                jax.block_until_ready(tok)
            traced.update({f"replay_{k}": v for k, v in traced_timeline(replay, n).items()})
        runner.pool.k, runner.pool.v = kp, vp
        roof = step_bytes(args, ckpt.weights, B, ctx_mean, jnp.dtype(dtype).itemsize) / bw
        rows.append(dict(backend=backend, mode=mode, batch=B, step_ms=step_s * 1e3, device_ms=dev_s * 1e3,
                         synced_call_ms=synced_s * 1e3, pipelined_call_ms=pipelined_s * 1e3,
                         dispatch_ms=disp / n * 1e3,
                         host_ms=(step_s - dev_s) * 1e3, roofline_ms=roof * 1e3, tok_s=B / step_s,
                         vs_roofline=step_s / roof, device_vs_roofline=dev_s / roof,
                         new_compiles_while_timed=orig_fn._cache_size() - comp0,
                         compilations=orig_fn._cache_size(), compile_s=runner.compile_seconds,
                         schedule_ms=parts.get("schedule", 0.0), prepare_ms=parts.get("_prepare", 0.0),
                         launch_ms=parts.get("launch", 0.0), collect_ms=parts.get("collect", 0.0),
                         **{**{k: float("nan") for k in TRACE_COLS}, **traced}))
        assert eng.allocator.all_free()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny model shape (CPU smoke run)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--backends", nargs="+", default=["auto", "reference"])
    ap.add_argument("--modes", nargs="+", default=["overlap", "lockstep"], choices=["overlap", "lockstep"])
    ap.add_argument("--profile", action="store_true", help="cProfile the timed steps of the largest batch")
    ap.add_argument("--trace-steps", type=int, default=8,
                    help="after the timed steps, trace this many with the JAX profiler (GPU): device busy/idle")
    a = ap.parse_args()
    on_gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    args = ModelArgs(**(SMALL if a.small else LLAMA3_8B))
    bw = max(b for _, _, b in copy_ceilings((1 << 31) if on_gpu else (1 << 24)))  # same ceiling as the kernels
    ckpt = device_random_checkpoint(args, dtype)
    nparams = sum(int(x.size) for x in ckpt.weights.values())
    rows = []
    for backend in a.backends:
        for mode in a.modes:
            rows += run(args, ckpt, backend, a.batch, a.ctx, a.steps, dtype, bw, overlap=mode == "overlap",
                        profile=a.profile, trace_steps=a.trace_steps)
    print(f"device: {jax.devices()[0].device_kind}; model: {nparams / 1e9:.2f}B params, "
          f"{jnp.dtype(dtype).name}, ctx {a.ctx}; copy bandwidth {bw / 1e12:.2f} TB/s (same run)")
    cols = ["backend", "mode", "batch", "tok_s", "step_ms", "device_ms", *TRACE_COLS,
            "dispatch_ms", "synced_call_ms", "pipelined_call_ms", "host_ms", "roofline_ms", "vs_roofline",
            "device_vs_roofline", "schedule_ms", "prepare_ms", "launch_ms", "collect_ms", "new_compiles_while_timed",
            "compilations", "compile_s"]
    print(" ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>12.3f}" if isinstance(r[c], float) else f"{r[c]:>12}" for c in cols))


if __name__ == "__main__":
    main()
