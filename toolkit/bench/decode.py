"""End-to-end decode benchmark against the memory roofline.

    python -m toolkit.bench.decode                                   # Llama-3-8B shape, GPU
    python -m toolkit.bench.decode "bench.backends=[auto]" "bench.modes=[overlap]"
    python -m toolkit.bench.decode -m "bench.batch_sizes=[1],[16],[64]"   # one run (and JSON) each
    python -m toolkit.bench.decode bench.quick=true "bench.batch_sizes=[1,2]" bench.steps=4 \
        "bench.backends=[reference]" bench.trace_steps=2               # tiny shape, CPU smoke run
    python -m toolkit.bench.decode bench.model=bamba-9b "bench.backends=[auto]" "bench.modes=[overlap]" \
        bench.prefill_len=4096                                         # the hybrid, + a 4K prefill

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

``bench.model=bamba-9b``: the Bamba-9B shape (ibm-fms/Bamba-9B's config.json: 32 layers,
attention at 9, 18, 27 with RoPE on half of each head, 29 Mamba2 mixers of 128 heads x 64,
one group, state 128, conv 4). Its roofline adds each sequence's recurrent state, read
once and written once per step in every Mamba2 layer (conv [C, K-1] in the model dtype, SSM
[H, P, N] float32: 4.2 MB a layer), and counts K/V in the attention layers only. Its
engine runs prefill steps before decode ones (``engine.interleave_decode=false``): the
timed steps are the same, and the warm-up compiles no decode shapes of partial batches.
The table then also has the roofline's state part and, from the profiler trace of the
replayed step, the device time by kernel kind (matmuls, attention kernels, the rest).

``bench.prefill_len=N`` (> 0): before the decode rows, the engine (its first backend and
mode) prefills one N-token prompt ``bench.prefill_reps`` times (after one that compiles),
prompt to first token, against the matmul ceiling of the same run: the FLOPs of every
projection over N tokens, the logits row, causal attention and the chunked SSD scan.
"""

from __future__ import annotations

import cProfile
import glob
import json
import re
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
from toolkit.cache.state_pool import StateLayout
from toolkit.models.random_init import device_random_checkpoint, hybrid_args, random_checkpoint
from toolkit.models.spec import ModelArgs

config.register()
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, max_position_embeddings=8192)
SMALL = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
             num_kv_heads=2, head_dim=32, tie_word_embeddings=False, max_position_embeddings=4096)
# ibm-fms/Bamba-9B (config.json): transformers' BambaConfig defaults but mamba_d_state 128,
# mamba_d_head 64, attn_layer_indices [9, 18, 27], vocab 128256; attn_rotary_emb 64 (half of 128)
BAMBA_9B = hybrid_args(dict(architecture="bamba", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=10000.0,
                            rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=262144,
                            attn_layer_indices=[9, 18, 27],
                            mamba=dict(num_heads=128, head_dim=64, n_groups=1, state_size=128, conv_kernel=4,
                                       chunk_size=256)))
SMALL_BAMBA = hybrid_args(dict(architecture="bamba", vocab_size=512, hidden_size=128, intermediate_size=256,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=False,
                               max_position_embeddings=4096, attn_layer_indices=[1],
                               mamba=dict(num_heads=4, head_dim=32, n_groups=1, state_size=16, conv_kernel=4,
                                          chunk_size=32)))
MODELS = {"llama3-8b": (LLAMA3_8B, SMALL), "bamba-9b": (BAMBA_9B, SMALL_BAMBA)}  # bench.model: (full, quick)
LEAD = 64  # most warm-up steps (prefill chunks interleaved with decode steps)
REPLAYS = 10  # calls per device-only replay
TRACE_COLS = ("trace_busy_ms", "trace_idle_ms", "replay_trace_busy_ms", "replay_trace_idle_ms")
COLS = ["backend", "mode", "batch", "tok_s", "step_ms", "device_ms", *TRACE_COLS, "dispatch_ms", "synced_call_ms",
        "pipelined_call_ms", "host_ms", "roofline_ms", "vs_roofline", "device_vs_roofline", "schedule_ms",
        "prepare_ms", "launch_ms", "collect_ms", "new_compiles_while_timed", "compilations", "compile_s"]
# with recurrent state: the roofline's state part, and the replay's kernel time by kind (GPU trace)
STATE_COLS = ["state_roofline_ms", "gemm_ms", "attn_kernel_ms", "other_kernel_ms"]
PREFILL_COLS = ["backend", "mode", "prompt", "prefill_ms", "tok_s", "tflop", "matmul_ceiling_ms", "vs_ceiling",
                "tflop_s", "compile_s"]
PREFILL_TRACE_COLS = ["trace_busy_ms", "gemm_ms", "attn_kernel_ms", "other_kernel_ms"]  # one traced prefill (GPU)
MATMUL_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "m_in_proj", "m_out_proj")


def step_bytes(args: ModelArgs, weights: dict, B: int, ctx: float, itemsize: int) -> float:
    """Bytes one decode step must read: every weight once (the embedding table only for
    the B rows it looks up) plus each sequence's K and V in every attention layer, plus
    (Mamba2 layers) each sequence's recurrent state read and written once."""
    w = sum(int(x.size) * (4 if x.dtype == jnp.float32 else itemsize) for k, x in weights.items() if k != "embed")
    w += B * args.hidden_size * itemsize
    kv = 2 * B * ctx * args.num_attn_layers * args.num_kv_heads * args.head_dim * itemsize
    return w + kv + state_bytes(args, B, itemsize)


def state_bytes(args: ModelArgs, B: int, itemsize: int) -> float:
    """Recurrent state one decode step reads and writes: per sequence and Mamba2 layer, the
    conv window (model dtype) and the SSM state (float32), each read once and written once."""
    if not args.has_state:
        return 0.0
    lay = StateLayout.for_model(args, 1, "float32")  # (the state pool's shapes; conv in the model dtype)
    conv, ssm = lay.slot_bytes
    return 2.0 * B * (conv // 4 * itemsize + ssm)


def prefill_flops(args: ModelArgs, weights: dict, T: int) -> float:
    """FLOPs of one T-token prompt's prefill: every projection over T rows, the logits of
    the last row, causal attention (QK^T and PV) in the attention layers, and the chunked
    SSD scan of the Mamba2 layers as computed (C.B and the intra-chunk product over full
    QxQ chunks, state in and out: 2*T*Q*(G*N + I) + 4*T*I*N a layer)."""
    proj = sum(int(weights[k].size) for k in MATMUL_KEYS if k in weights)
    f = 2.0 * T * proj + 2.0 * args.hidden_size * args.vocab_size
    f += 2.0 * T * T * args.num_heads * args.head_dim * args.num_attn_layers
    if args.has_state:
        from toolkit.models.mamba2 import MambaArgs

        m = MambaArgs.from_dict(args.mamba)
        Q, I = min(m.chunk_size, T), m.intermediate_size
        f += args.num_mamba_layers * (2.0 * T * Q * (m.n_groups * m.state_size + I) + 4.0 * T * I * m.state_size)
    return f


# ---- the JAX profiler's view (GPU) ------------------------------------------------------------


def kernel_kind(name: str) -> str:
    """gemm (cuBLAS / cuBLASLt with its nvjet kernels / XLA's Triton GEMM fusions), attn (our
    Pallas and Mosaic GPU attention kernels), or other (XLA's elementwise, reduction, gather/scatter fusions)."""
    n = name.lower()
    if any(t in n for t in ("gemm", "xmma", "cutlass", "cublas", "nvjet", "matmul", "__dot", "wgmma")):
        return "gemm"
    if any(t in n for t in ("attention", "paged", "decode", "prefill", "write_kv", "mosaic")):
        return "attn"
    return "other"


def device_timeline(trace_dir: str, num_steps: int, kinds: bool = False) -> dict:
    """Busy and idle time of the GPU per step, from a profiler trace of ``num_steps`` steps:
    the union of kernel intervals on the device's streams over the traced window.
    ``kinds``: also the kernel time per step by ``kernel_kind`` (gemm_ms, attn_kernel_ms,
    other_kernel_ms) and the top kernel families (digits stripped from the names)."""
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
    out = dict(trace_busy_ms=busy / num_steps / 1e6, trace_idle_ms=(window - busy) / num_steps / 1e6)
    if kinds:
        by_kind, family = Counter(), Counter()
        for name, t in by_name.items():
            by_kind[kernel_kind(name)] += t
            family[re.sub(r"[._]\d+", "", name)] += t
        out |= {f"{k}_ms" if k == "gemm" else f"{k}_kernel_ms": by_kind[k] / num_steps / 1e6
                for k in ("gemm", "attn", "other")}
        out["top_kernels_ms"] = {n: t / num_steps / 1e6 for n, t in family.most_common(15)}
        print(f"trace: kernel kinds (ms per step): {out['top_kernels_ms']}", file=sys.stderr)
    return out


def traced_timeline(body, num_steps: int, kinds: bool = False) -> dict:
    """Run ``body`` (num_steps steps, synced at the end) under the JAX profiler."""
    tdir = tempfile.mkdtemp()
    jax.profiler.start_trace(tdir)
    try:
        body()
    finally:
        jax.profiler.stop_trace()
    return device_timeline(tdir, num_steps, kinds)


# ---- one engine, one mode ---------------------------------------------------------------------


def make_engine(ckpt: Checkpoint, b: config.DecodeBench, backend: str, overlap: bool, dtype) -> Engine:
    """An engine sized so that the largest batch fits with room to spare: requests prefilled
    early run ahead of the last ones by the warm-up steps (< LEAD), so each may take
    LEAD + steps (+ traced steps) tokens and none finishes while steps are timed."""
    maxB, ctx = max(b.batch_sizes), b.ctx
    most_new = LEAD + b.steps + b.trace_steps
    num_pages = maxB * pages_for(ctx + most_new + 8, b.page_size) + 8
    chunk, max_len = min(8192, maxB * ctx), ctx + most_new + 16
    if b.prefill_len > 0:  # one prompt of prefill_len tokens in one chunk (+ its first token)
        num_pages = max(num_pages, pages_for(b.prefill_len + 8, b.page_size) + 8)
        chunk, max_len = max(chunk, b.prefill_len), max(max_len, b.prefill_len + 16)
    ecfg = EngineConfig(page_size=b.page_size, num_pages=num_pages, memory_fraction=0.0, max_batch_size=maxB,
                        chunk_size=chunk, max_prefill_seqs=16, max_model_len=max_len, min_bucket=1,
                        attention_backend=backend, overlap_schedule=overlap,
                        interleave_decode=not ckpt.args.is_hybrid)
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


def replay_times(probe: StepProbe, call, trace: bool, kinds: bool = False) -> dict:
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
            tl = traced_timeline(body, n, kinds)
            out["traced"] = {k if k in STATE_COLS or k == "top_kernels_ms" else f"replay_{k}": v
                             for k, v in tl.items()}
    finally:
        rep.close()
    return out


def prefill_rows(eng: Engine, args: ModelArgs, weights: dict, b: config.DecodeBench, backend: str, mode: str,
                 flop_s: float) -> list[dict]:
    """Prompt to first token of one bench.prefill_len-token prompt (one chunk), timed
    bench.prefill_reps times after one that compiles; against the matmul ceiling."""
    rng = np.random.default_rng(1)
    T, times = b.prefill_len, []
    comp0, csec0 = eng.stats().num_compilations, eng.stats().compile_seconds
    for _ in range(b.prefill_reps + 1):
        params = SamplingParams(max_new_tokens=1, ignore_eos=True)
        eng.sync()
        t0 = time.perf_counter()
        s = eng.add_request(list(rng.integers(300, args.vocab_size - 10, T)), params)
        while not s.is_finished:
            eng.step()
        eng.sync()
        times.append(time.perf_counter() - t0)
        assert len(s.output_ids) == 1, "the prefill did not end in its first token"
    traced = {}
    if b.trace_steps:  # one more prefill under the profiler: device time by kernel kind
        def body():
            s = eng.add_request(list(rng.integers(300, args.vocab_size - 10, T)), params)
            while not s.is_finished:
                eng.step()
            eng.sync()
        traced = traced_timeline(body, 1, kinds=True)
    st = eng.stats()
    assert st.pages_used == 0 and not st.running and not st.waiting, f"pages or requests left behind: {st}"
    t = float(np.median(times[1:]))
    flops = prefill_flops(args, weights, T)
    print(f"prefill {T}: {[round(x * 1e3, 2) for x in times]} ms (first compiles: "
          f"{st.num_compilations - comp0} new)", file=sys.stderr)
    return [dict(backend=backend, mode=mode, prompt=T, prefill_ms=t * 1e3, tok_s=T / t, tflop=flops / 1e12,
                 matmul_ceiling_ms=flops / flop_s * 1e3, vs_ceiling=t / (flops / flop_s), tflop_s=flops / t / 1e12,
                 compile_s=st.compile_seconds - csec0, **traced)]


def run(args: ModelArgs, ckpt: Checkpoint, b: config.DecodeBench, backend: str, overlap: bool, dtype,
        bw: float, flop_s: float = 0.0) -> tuple[list[dict], list[dict]]:
    """The decode rows of one engine (backend, mode) and, when ``flop_s`` is given and
    bench.prefill_len > 0, its prefill row."""
    eng = make_engine(ckpt, b, backend, overlap, dtype)
    probe = StepProbe(eng)
    rng = np.random.default_rng(0)
    rows, mode = [], "overlap" if overlap else "lockstep"
    # the prefill first, on the idle engine (each row also goes to stderr as soon as it exists)
    pre = prefill_rows(eng, args, ckpt.weights, b, backend, mode, flop_s) if flop_s and b.prefill_len > 0 else []
    for r in pre:
        print(f"row: {json.dumps(r)}", file=sys.stderr)
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
        rep = replay_times(probe, call, trace=b.trace_steps > 0, kinds=args.has_state)
        traced.update(rep.get("traced", {}))
        step_s, dev_s = float(np.median(times)), rep["device_s"]
        itemsize = jnp.dtype(dtype).itemsize
        roof = step_bytes(args, ckpt.weights, B, ctx_mean, itemsize) / bw
        extra = {}
        if args.has_state:
            extra = {k: float("nan") for k in STATE_COLS} | {"state_roofline_ms": state_bytes(args, B, itemsize) / bw * 1e3}
        st = eng.stats()
        assert st.pages_used == 0 and not st.running and not st.waiting, f"pages or requests left behind: {st}"
        rows.append(dict(backend=backend, mode=mode, batch=B, step_ms=step_s * 1e3, device_ms=dev_s * 1e3,
                         synced_call_ms=rep["synced_s"] * 1e3, pipelined_call_ms=rep["pipelined_s"] * 1e3,
                         dispatch_ms=rep["dispatch_s"] * 1e3, host_ms=(step_s - dev_s) * 1e3,
                         roofline_ms=roof * 1e3, tok_s=B / step_s, vs_roofline=step_s / roof,
                         device_vs_roofline=dev_s / roof, new_compiles_while_timed=new_compiles,
                         compilations=st.num_compilations, compile_s=st.compile_seconds, **parts,
                         **{**extra, **{k: float("nan") for k in TRACE_COLS}, **traced}))
        print(f"row: {json.dumps(rows[-1], default=str)}", file=sys.stderr)
    return rows, pre


def job(cfg: config.DecodeRun) -> None:
    b = cfg.bench
    bad = set(b.modes) - {"overlap", "lockstep"}
    if bad:
        raise ConfigError(f"bench.modes has {sorted(bad)}; allowed: overlap, lockstep")
    if b.model not in MODELS:
        raise ConfigError(f"bench.model is {b.model!r}; allowed: {', '.join(MODELS)}")
    if b.prefill_len < 0 or b.prefill_reps < 1:
        raise ConfigError("bench.prefill_len must be >= 0 and bench.prefill_reps >= 1")
    on_gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    args = ModelArgs(**MODELS[b.model][1 if b.quick else 0])
    bw = core.copy_bandwidth((1 << 31) if on_gpu else (1 << 24))  # the same ceiling as the kernels
    flop_s = core.matmul_ceiling(8192 if on_gpu else 256)[1] if b.prefill_len > 0 else 0.0
    # (a tiny hybrid's weights from the host: on a CPU, one device sampler per shape compiles for seconds)
    ckpt = random_checkpoint(args) if b.quick and args.is_hybrid else device_random_checkpoint(args, dtype)
    nparams = sum(int(x.size) for x in ckpt.weights.values())
    rows, pre = [], []
    for backend in b.backends:
        for mode in b.modes:
            r, p = run(args, ckpt, b, backend, mode == "overlap", dtype, bw, flop_s if not pre else 0.0)
            rows, pre = rows + r, pre + p
    name = "" if b.model == "llama3-8b" else f"{b.model}{' (quick)' if b.quick else ''} shape, "
    extra = {} if not flop_s else {"matmul_tflop_s": round(flop_s / 1e12, 1)}
    card = core.device_card(model=f"{name}{nparams / 1e9:.2f}B params, {jnp.dtype(dtype).name}, ctx {b.ctx}",
                            copy_tb_s=round(bw / 1e12, 3), **extra)
    roof = "weights + K/V" + (" + state read and written" if args.has_state else "")
    cols = COLS + (STATE_COLS if args.has_state else [])
    if pre:  # the prefill table first: the decode table stays last on stdout
        print(f"Prefill of one {b.prefill_len}-token prompt, prompt to first token, against the matmul "
              f"ceiling ({flop_s / 1e12:.1f} TFLOP/s, [8192, 8192] matmul of the same run)")
        pcols = PREFILL_COLS + ([c for c in PREFILL_TRACE_COLS if c in pre[0]] if pre else [])
        for line in core.format_table(pre, pcols):
            print(line)
        print()
    core.report("decode", rows, cols, card=card, config=b, json_out=b.json_out,
                title=f"Engine decode step against the memory roofline ({roof} over the copy "
                      "bandwidth measured in the same run)", extra={"prefill": pre} if pre else None)



main = hydra_main(job, config_name="bench/decode")

if __name__ == "__main__":
    main()
