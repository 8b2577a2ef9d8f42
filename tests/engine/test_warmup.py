"""Engine.warmup on the tiny random model: it compiles exactly the bucket set, and serving
afterwards (short and chunked prompts, every batch size, greedy and sampled, preemption)
compiles nothing and gives the same tokens as an engine that was never warmed up."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from toolkit.engine import compile_cache
from toolkit.engine.request import SamplingParams

# Compact layout, tiny sizes: 7 step shapes (decode B in {4, 8}, greedy and sampling; prefill
# T in {4, 8, 16} with B=2; W=16). 40 pages (39 usable, 16 for a full context) hold a
# full batch of short requests but make a decode batch of long ones preempt.
CFG = dict(shape_buckets="compact", max_model_len=64, max_batch_size=8, chunk_size=16, max_prefill_seqs=2,
           min_bucket=4, page_size=4, num_pages=40)
NUM_SHAPES = 2 * 2 + 3


def workload(seed: int = 0) -> list[tuple[list[tuple[list[int], SamplingParams]], bool]]:
    """Waves of requests (and whether the wave arrives at once, else one request per step
    while the engine runs). Short prompts (1-6 tokens) and long ones (17-50: chunked prefill over 2-4 steps), greedy
    and seeded temperature > 0, lengths up to the full context (max_model_len=64)."""
    rng = np.random.default_rng(seed)

    def req(n: int, max_new: int, temp: float, k: int):
        prompt = [int(t) for t in rng.integers(3, 384, n)]
        return prompt, SamplingParams(max_new_tokens=max_new, temperature=temp, top_k=k, seed=int(rng.integers(2**31)),
                                      ignore_eos=True)

    waves = [
        ([req(3, 6, 0.0, 0)], False),  # alone: decode batch 1
        ([req(40, 24, 0.0, 0)], False),  # alone, chunked: 16 + 16 + 8
        ([req(5, 10, 0.0, 0), req(2, 12, 0.9, 20)], False),  # greedy and sampled in one batch
        # 10 short ones at once (> max_batch_size): full decode batches, then 7, 6, ... as they end
        ([req(int(rng.integers(1, 4)), 4 + i, 0.7 if i == 3 else 0.0, 0) for i in range(10)], True),
    ]
    burst = []  # long and short, staggered: the pool runs out, decode preempts
    for i in range(14):
        n = int(rng.integers(17, 51)) if i % 3 == 0 else int(rng.integers(1, 7))
        max_new = int(rng.integers(8, 64 - n)) if 64 - n > 8 else 1
        burst.append(req(n, max_new, 0.8 if i % 4 == 1 else 0.0, 0 if i % 2 else 8))
    burst.append(req(63, 1, 0.0, 0))  # the longest prompt the context allows
    waves.append((burst, False))
    return waves


def run_workload(engine, waves) -> tuple[list[list[int]], list[bool], set[int]]:
    """Run the waves (a wave starts once the engine is idle); returns every request's output
    ids, whether it was greedy, and the decode batch sizes the runner saw."""
    decode_sizes: set[int] = set()
    launch = engine.runner.launch

    def spy(batch, prev=None):
        if batch.is_decode:
            decode_sizes.add(len(batch.seqs))
        return launch(batch, prev)

    engine.runner.launch = spy
    seqs = []
    try:
        for wave, at_once in waves:
            pending = list(wave)
            while pending or engine.has_unfinished():
                while pending:
                    prompt, params = pending.pop(0)
                    seqs.append(engine.add_request(prompt, dataclasses.replace(params)))
                    if not at_once:
                        break
                engine.step()
    finally:
        engine.runner.launch = launch
    assert all(s.is_finished for s in seqs)
    return [list(s.output_ids) for s in seqs], [s.params.temperature == 0 for s in seqs], decode_sizes


def test_warmup_compiles_the_set_then_serving_compiles_nothing(tiny_ckpt, make_engine):
    """Guards against warm-up compiling executables serving does not use (a step input
    whose dtype, shape or commitment differs between warm-up's padding and a real batch:
    each request would still compile), against a bucket set that misses a shape the
    scheduler produces (chunked prefill, a preempted request's recompute, a partial decode
    batch, mixed greedy/sampled), and against warm-up's padding steps leaving anything in
    the pool or the allocator that changes later outputs."""
    warm = make_engine(tiny_ckpt, **CFG)
    assert len(warm.bucket_set()) == NUM_SHAPES == warm.stats().max_compilations
    assert warm.stats().num_compilations == 0 and not warm.stats().warmed_up
    rep = warm.warmup(force=True, progress=False)
    st = warm.stats()
    assert rep is not None and rep.shapes == NUM_SHAPES
    # every shape compiled, loaded from JAX's cache, or loaded from the step store
    assert rep.compiled + rep.loaded + rep.stored >= NUM_SHAPES
    assert st.warmed_up and st.num_compilations == st.max_compilations == NUM_SHAPES
    assert st.idle and st.pages_free == st.pages_usable
    assert warm.warmup(force=True, progress=False).shapes == 0  # a second warm-up has nothing to do

    waves = workload()
    before = compile_cache.counts()
    got, greedy, sizes = run_workload(warm, waves)
    after = compile_cache.counts()
    st = warm.stats()
    assert st.num_compilations == NUM_SHAPES, "serving compiled a step shape after warm-up"
    # stronger: no XLA compile request at all (no other jitted function either) while serving
    assert after.requests == before.requests, (before, after)
    assert st.num_preemptions > 0, "the pool never ran out: preemption untested"
    assert sizes == set(range(1, 9)), f"decode batch sizes seen: {sorted(sizes)}"
    assert st.idle and st.pages_free == st.pages_usable, st

    cold = make_engine(tiny_ckpt, **CFG)  # the same config, never warmed up: compiles on first use
    ref, _, _ = run_workload(cold, waves)
    # the workload used every shape of the set: warm-up compiled nothing serving does not need
    assert cold.stats().num_compilations == NUM_SHAPES and not cold.stats().warmed_up
    assert cold.stats().num_preemptions == st.num_preemptions
    for i, (g, r, is_greedy) in enumerate(zip(got, ref, greedy)):
        if is_greedy:
            assert g == r, f"request {i} (greedy) differs after warm-up"
    # seeded sampling is deterministic too: the same batches ran in both engines
    assert got == ref
    assert sum(greedy) >= 10 and not all(greedy)


def test_warmup_off_returns_none_and_compiles_nothing(tiny_ckpt, make_engine):
    """Guards against warm-up running when engine.warmup is off and force is not given (a CPU
    server would compile the whole set at start-up for nothing)."""
    e = make_engine(tiny_ckpt, **CFG)
    assert not e.cfg.warmup
    before = compile_cache.counts()
    assert e.warmup() is None
    assert e.warmup(force=False, progress=False) is None
    st = e.stats()
    assert st.num_compilations == 0 and not st.warmed_up
    assert compile_cache.counts().requests == before.requests


def test_warmup_refuses_an_engine_with_work(tiny_ckpt, make_engine):
    """Guards against warm-up running padding steps while a request is queued or a step is in
    flight (it would run steps the scheduler does not know of, and mark an engine warmed up
    mid-request)."""
    e = make_engine(tiny_ckpt, **CFG)
    seq = e.add_request([5, 6, 7], SamplingParams(max_new_tokens=4, ignore_eos=True))
    with pytest.raises(RuntimeError, match="before the first request"):
        e.warmup(force=True, progress=False)
    e.step()  # admitted and launched (overlap: the step is in flight)
    assert e.has_unfinished()
    with pytest.raises(RuntimeError, match="before the first request"):
        e.warmup(force=True, progress=False)
    assert not e.stats().warmed_up
    e.run_until_done()
    assert seq.is_finished and len(seq.output_ids) == 4
    assert e.stats().idle


def test_prefill_only_warmup_has_no_decode_shapes(tiny_ckpt):
    """Guards against a prefill-only engine (role=prefill: one sampled token per request)
    compiling the decode family at start-up, or its prefill steps missing the set."""
    from tests.conftest import engine_cfg
    from toolkit.engine.engine import Engine

    e = Engine(tiny_ckpt, engine_cfg(**CFG), prefill_only=True)
    shapes = e.bucket_set()
    assert len(shapes) == 3 and not any(s.startswith("decode") for s in shapes)
    rep = e.warmup(force=True, progress=False)
    assert rep.shapes == 3 and e.stats().num_compilations == 3 == e.stats().max_compilations
    ps = [[int(t) for t in np.random.default_rng(i).integers(3, 384, n)] for i, n in enumerate((1, 7, 16, 40, 63))]
    outs = e.generate(ps, [SamplingParams(max_new_tokens=1, temperature=t, seed=1) for t in (0, 0.7, 0, 0.7, 0)])
    assert [len(o.token_ids) for o in outs] == [1] * 5
    assert e.stats().num_compilations == 3 and e.stats().idle


def test_compact_and_fine_layouts_give_the_same_tokens(tiny_ckpt, make_engine):
    """Guards against the compact layout (one page-table width, one prefill sequence count:
    padding rows and columns the kernels must ignore) changing any output against the fine
    layout (tables padded only to the next power of two), greedy and seeded sampling."""
    waves = workload(seed=1)[:3]  # alone, chunked, greedy + sampled in one batch
    compact = make_engine(tiny_ckpt, **CFG)
    fine = make_engine(tiny_ckpt, **{**CFG, "shape_buckets": "fine"})
    got, greedy, _ = run_workload(compact, waves)
    ref, _, _ = run_workload(fine, waves)
    assert fine.runner.buckets.layout == "fine" and len(fine.runner.buckets.widths) > 1
    assert got == ref and any(greedy) and not all(greedy)
    assert compact.stats().idle and fine.stats().idle


def test_restart_loads_every_step_shape_from_the_store(tiny_ckpt, make_engine, tmp_path, caplog):
    """Guards against a restarted engine tracing, lowering or compiling a step shape it has
    stored (a warm start would cost a second or more per shape on a GPU), against a stored
    executable that computes something else than a fresh one (weights baked in as constants:
    another seed's weights must give that seed's tokens), and against an unreadable stored
    file failing the start instead of being compiled again."""
    import dataclasses as dc

    from tests.conftest import TINY_MODEL
    from toolkit.models.loader import load_checkpoint

    # a pool size no other test uses: JAX's cache (shared by the process) cannot hold these
    # programs already, so each is compiled here and stored
    cfg = {**CFG, "num_pages": 44, "compile_cache_dir": str(tmp_path)}
    waves = workload(seed=2)[:3]
    first = make_engine(tiny_ckpt, **cfg)
    rep = first.warmup(force=True, progress=False)
    assert rep.stored == 0 and len(list((tmp_path / "steps").glob("*.exe"))) == NUM_SHAPES
    ref, _, _ = run_workload(first, waves)

    again = make_engine(tiny_ckpt, **cfg)
    before = compile_cache.counts()
    rep = again.warmup(force=True, progress=False)
    after = compile_cache.counts()
    assert rep.stored == NUM_SHAPES and again.stats().step_loaded == NUM_SHAPES, rep
    assert after.requests == before.requests, "a stored shape was compiled (or loaded from JAX's cache)"
    assert after.trace_seconds == before.trace_seconds, "a stored shape was traced"
    got, _, _ = run_workload(again, waves)
    assert got == ref, "a stored executable gave other tokens than the compiled one"
    assert compile_cache.counts().requests == after.requests

    other = load_checkpoint(dc.replace(TINY_MODEL, seed=7), progress=False)  # same shapes, other weights
    fresh = make_engine(other, **{**cfg, "compile_cache_dir": ""})
    fresh.warmup(force=True, progress=False)
    want, _, _ = run_workload(fresh, waves)
    assert want != ref
    stored = make_engine(other, **cfg)
    assert stored.warmup(force=True, progress=False).stored == NUM_SHAPES
    assert run_workload(stored, waves)[0] == want, "the stored executable ignored its weights"

    victim = sorted((tmp_path / "steps").glob("*.exe"))[0]
    victim.write_bytes(b"not an executable")
    torn = make_engine(tiny_ckpt, **cfg)
    with caplog.at_level("WARNING", logger="toolkit.engine.compile_cache"):
        rep = torn.warmup(force=True, progress=False)
    assert rep.stored == NUM_SHAPES - 1 and "cannot load the stored executable" in caplog.text
    assert run_workload(torn, waves)[0] == ref
    assert len(list((tmp_path / "steps").glob("*.exe"))) == NUM_SHAPES  # rewritten, no temp files left
