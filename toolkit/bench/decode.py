"""End-to-end decode benchmark against the memory roofline.

    python -m toolkit.bench.decode                                   # Llama-3-8B shape, GPU
    python -m toolkit.bench.decode "bench.backends=[auto]" "bench.modes=[overlap]"
    python -m toolkit.bench.decode -m "bench.batch_sizes=[1],[16],[64]"   # one run (and JSON) each
    python -m toolkit.bench.decode bench.quick=true "bench.batch_sizes=[1,2]" bench.steps=4 \
        "bench.backends=[reference]" bench.trace_steps=2               # tiny shape, CPU smoke run

A Llama-3-8B-shaped model with random bf16 weights (made on the device, no download) runs
in the engine. For each batch size B, B random prompts of bench.ctx tokens are prefilled,
then bench.steps decode steps are timed. The roofline of one decode step is the bytes it
must read (every weight once, plus each sequence's K/V) over the copy bandwidth measured
in the same run (the best of an XLA and a torch copy). The device time of one step is
measured by issuing the recorded jitted step back to back with the same inputs (the
device never waits for the host); the host overhead is the engine's step time minus that.
Each backend runs in both engine modes: ``overlap`` (step N+1 launched before step N's
tokens are read, the default) and ``lockstep``.

Checked while timing (a failure stops the run): every timed step runs the full batch, no
request finishes, nothing compiles, and every page is back afterwards.
"""

from __future__ import annotations

import cProfile
import glob
import pstats
import statistics
import sys
import tempfile
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from toolkit.bench import config, core
from toolkit.cache.allocator import pages_for
from toolkit.cli import hydra_main
from toolkit.config.schema import CacheConfig, EngineConfig
from toolkit.config.validate import ConfigError
from toolkit.engine.engine import Engine
from toolkit.engine.probe import StepProbe
from toolkit.engine.request import SamplingParams
from toolkit.models.checkpoint import Checkpoint
from toolkit.models.random_init import device_random_checkpoint
from toolkit.models.spec import ModelArgs

config.register()
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=8192)
SMALL = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
             num_kv_heads=2, head_dim=32, tie_word_embeddings=False, max_position_embeddings=4096)
LEAD = 64  # most warm-up steps (prefill chunks interleaved with decode steps)
REPLAYS = 10  # calls per device-only replay
TRACE_COLS = ("trace_busy_ms", "trace_idle_ms", "replay_trace_busy_ms", "replay_trace_idle_ms")
COLS = ["backend", "mode", "batch", "tok_s", "step_ms", "device_ms", *TRACE_COLS, "dispatch_ms", "synced_call_ms",
        "pipelined_call_ms", "host_ms", "roofline_ms", "vs_roofline", "device_vs_roofline", "schedule_ms",
        "prepare_ms", "launch_ms", "collect_ms", "new_compiles_while_timed", "compilations", "compile_s"]


def step_bytes(args: ModelArgs, weights: dict, B: int, ctx: float, itemsize: int) -> float:
    """Bytes one decode step must read: every weight once (the embedding table only for
    the B rows it looks up) plus each sequence's K and V in every layer."""
    w = sum(int(x.size) for k, x in weights.items() if k != "embed") * itemsize
    w += B * args.hidden_size * itemsize
    kv = 2 * B * ctx * args.num_layers * args.num_kv_heads * args.head_dim * itemsize
    return w + kv


# ---- the JAX profiler's view (GPU) ------------------------------------------------------------


def device_timeline(trace_dir: str, num_steps: int) -> dict:
    """Busy and idle time of the GPU per step, from a profiler trace of ``num_steps`` steps:
    the union of kernel intervals on the device's streams over the traced window."""
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
    if not spans:  # no GPU plane (CPU)
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


# ---- one engine, one mode ---------------------------------------------------------------------


def make_engine(ckpt: Checkpoint, b: config.DecodeBench, backend: str, overlap: bool, dtype) -> Engine:
    """An engine sized so that the largest batch fits with room to spare: requests prefilled
    early run ahead of the last ones by the warm-up steps (< LEAD), so each may take
    LEAD + steps (+ traced steps) tokens and none finishes while steps are timed."""
    maxB, ctx = max(b.batch_sizes), b.ctx
    most_new = LEAD + b.steps + b.trace_steps
    ecfg = EngineConfig(page_size=b.page_size, num_pages=maxB * pages_for(ctx + most_new + 8, b.page_size) + 8,
                        memory_fraction=0.0, max_batch_size=maxB, chunk_size=min(8192, maxB * ctx),
                        max_prefill_seqs=16, max_model_len=ctx + most_new + 16, min_bucket=1,
                        attention_backend=backend, overlap_schedule=overlap)
    # no prefix cache: sequences sharing cached pages would read the same KV, and the step
    # time would not be the roofline's (every sequence reads its own context)
    return Engine(ckpt, ecfg, dtype, cache=CacheConfig(policy="none"))


def timed_steps(eng: Engine, probe: StepProbe, steps: int, profile: str = "") -> list[float]:
    """Seconds of each of ``steps`` engine steps; any compile here is a bug in the shape
    bucketing (logged by jax.log_compiles, counted by the caller). ``profile``: a label;
    when given, the steps run under cProfile and its top entries go to stderr."""
    probe.reset()
    prof = cProfile.Profile() if profile else None
    times = []
    if prof:
        prof.enable()
    with jax.log_compiles(True):
        for _ in range(steps):
            t0 = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t0)
    if prof:
        prof.disable()
        print(f"--- host profile, {profile}, {steps} steps", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    return times


def replay_times(probe: StepProbe, call, trace: bool) -> dict:
    """Device-only times of the recorded step (the engine idle meanwhile): back to back,
    synced every call, pipelined as the overlapped engine; optionally traced."""
    rep = probe.replay(call)
    out = {}
    try:
        n = REPLAYS
        out["device_s"] = core.time_calls(rep.step, warmup=0, iters=n, reps=2)[-1]
        out["dispatch_s"] = statistics.mean(rep.dispatch_s[-n:])
        out["synced_s"] = core.bench(rep.synced_step, sync=lambda _: None, warmup=0, iters=n, reps=1)
        out["pipelined_s"] = core.bench(rep.pipelined_step, sync=jax.device_get, warmup=1, iters=n, reps=1)
        if trace:  # the replay's device time under the same profiler as the engine's
            def body():
                jax.block_until_ready([rep.step() for _ in range(n)][-1])
            out["traced"] = {f"replay_{k}": v for k, v in traced_timeline(body, n).items()}
    finally:
        rep.close()
    return out


def run(args: ModelArgs, ckpt: Checkpoint, b: config.DecodeBench, backend: str, overlap: bool, dtype,
        bw: float) -> list[dict]:
    eng = make_engine(ckpt, b, backend, overlap, dtype)
    probe = StepProbe(eng)
    rng = np.random.default_rng(0)
    rows, mode = [], "overlap" if overlap else "lockstep"
    for B in tqdm(b.batch_sizes, desc=f"{backend}, {mode}: batch sizes", file=sys.stderr):
        params = SamplingParams(max_new_tokens=LEAD + b.steps + b.trace_steps, ignore_eos=True)
        seqs = [eng.add_request(list(rng.integers(300, args.vocab_size - 10, b.ctx)), params) for _ in range(B)]
        warmup = 0
        while any(len(s.output_ids) < 2 for s in seqs):  # prefill, plus one decode step to compile
            eng.step()
            warmup += 1
        assert warmup < LEAD, f"warm-up took {warmup} steps"
        ctx0 = np.mean([s.num_computed for s in seqs])
        comp0 = eng.stats().num_compilations
        profile = b.profile and B == max(b.batch_sizes)
        times = timed_steps(eng, probe, b.steps, f"{backend} {mode} B={B}" if profile else "")
        parts = probe.part_ms(b.steps)
        new_compiles = eng.stats().num_compilations - comp0
        ctx_mean = (ctx0 + np.mean([s.num_computed for s in seqs])) / 2
        call = probe.last_decode()  # the last timed step: every request in it
        assert call is not None and call.num_rows == probe.padded_batch(B), "a timed step ran part of the batch"
        assert all(not s.is_finished for s in seqs), "a request finished while steps were timed"
        traced = {}
        if b.trace_steps:  # after the timed steps: the profiler slows the host (no GPU plane on CPU)
            def engine_steps():
                for _ in range(b.trace_steps):
                    eng.step()
                eng.sync()
            traced = traced_timeline(engine_steps, b.trace_steps)
        for s in seqs:
            eng.abort(s.request_id)
        eng.sync()
        rep = replay_times(probe, call, trace=b.trace_steps > 0)
        traced.update(rep.get("traced", {}))
        step_s, dev_s = float(np.median(times)), rep["device_s"]
        roof = step_bytes(args, ckpt.weights, B, ctx_mean, jnp.dtype(dtype).itemsize) / bw
        st = eng.stats()
        assert st.pages_used == 0 and not st.running and not st.waiting, f"pages or requests left behind: {st}"
        rows.append(dict(backend=backend, mode=mode, batch=B, step_ms=step_s * 1e3, device_ms=dev_s * 1e3,
                         synced_call_ms=rep["synced_s"] * 1e3, pipelined_call_ms=rep["pipelined_s"] * 1e3,
                         dispatch_ms=rep["dispatch_s"] * 1e3, host_ms=(step_s - dev_s) * 1e3,
                         roofline_ms=roof * 1e3, tok_s=B / step_s, vs_roofline=step_s / roof,
                         device_vs_roofline=dev_s / roof, new_compiles_while_timed=new_compiles,
                         compilations=st.num_compilations, compile_s=st.compile_seconds, **parts,
                         **{**{k: float("nan") for k in TRACE_COLS}, **traced}))
    return rows


def job(cfg: config.DecodeRun) -> None:
    b = cfg.bench
    bad = set(b.modes) - {"overlap", "lockstep"}
    if bad:
        raise ConfigError(f"bench.modes has {sorted(bad)}; allowed: overlap, lockstep")
    on_gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    args = ModelArgs(**(SMALL if b.quick else LLAMA3_8B))
    bw = core.copy_bandwidth((1 << 31) if on_gpu else (1 << 24))  # the same ceiling as the kernels
    ckpt = device_random_checkpoint(args, dtype)
    nparams = sum(int(x.size) for x in ckpt.weights.values())
    rows = []
    for backend in b.backends:
        for mode in b.modes:
            rows += run(args, ckpt, b, backend, mode == "overlap", dtype, bw)
    card = core.device_card(model=f"{nparams / 1e9:.2f}B params, {jnp.dtype(dtype).name}, ctx {b.ctx}",
                            copy_tb_s=round(bw / 1e12, 3))
    core.report("decode", rows, COLS, card=card, config=b, json_out=b.json_out,
                title="Engine decode step against the memory roofline (weights + K/V over the copy "
                      "bandwidth measured in the same run)")



main = hydra_main(job, config_name="bench/decode")

if __name__ == "__main__":
    main()
