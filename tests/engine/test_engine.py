"""Engine behaviour on the tiny random model: batching, chunking, donation, compilation, sampling."""

import dataclasses

import numpy as np
import pytest

from toolkit.engine.request import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


def prompts(n, seed=0, lo=1, hi=40, vocab=384):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, vocab, rng.integers(lo, hi))) for _ in range(n)]


def one_by_one(engine, ps, params=GREEDY):
    return [engine.generate([p], params)[0].token_ids for p in ps]


def test_batched_equals_one_by_one_with_staggered_joins(tiny_ckpt, make_engine):
    """Guards against cross-talk between sequences in a batch and against requests that join a
    running decode batch at a later step reading someone else's KV."""
    ps = prompts(7, seed=1)
    ref = one_by_one(make_engine(tiny_ckpt), ps)
    e = make_engine(tiny_ckpt)
    seqs, pending = [], list(ps)
    while pending or e.has_unfinished():
        if pending:  # one new request every step: each joins a batch that is already decoding
            seqs.append(e.add_request(pending.pop(0), dataclasses.replace(GREEDY)))
        e.step()
    assert [s.output_ids for s in seqs] == ref


@pytest.mark.parametrize("chunk_size,page_size", [(3, 4), (5, 4), (6, 8), (16, 4)])
def test_chunked_prefill_equals_unchunked(tiny_ckpt, make_engine, chunk_size, page_size):
    """Guards against chunk boundaries that split a page or fall mid-prompt corrupting KV or positions."""
    ps = prompts(4, seed=2, lo=10, hi=60)
    ref = make_engine(tiny_ckpt, chunk_size=128, page_size=page_size).generate(ps, GREEDY)
    got = make_engine(tiny_ckpt, chunk_size=chunk_size, page_size=page_size).generate(ps, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


def test_kv_pool_address_stable_under_donation(tiny_ckpt, make_engine):
    """Guards against a step that copies the pool instead of updating the donated buffer in place
    (NIXL registers the address once)."""
    e = make_engine(tiny_ckpt)
    before = e.pool.buffer_pointers()
    for p in prompts(5, seed=3):
        e.add_request(p, dataclasses.replace(GREEDY, max_new_tokens=20))
    steps = 0
    while e.has_unfinished():
        e.step()
        steps += 1
        assert e.pool.buffer_pointers() == before, f"pool moved at step {steps}"
    assert steps > 20


def test_compilations_bounded_and_reused(tiny_ckpt, make_engine):
    """Guards against shapes leaking into jit unbucketed (a compile per request length)."""
    e = make_engine(tiny_ckpt)
    work = prompts(12, seed=4, lo=1, hi=100)
    params = [dataclasses.replace(GREEDY, max_new_tokens=int(n)) for n in np.random.default_rng(5).integers(1, 30, 12)]
    e.generate(work, params)
    first = e.num_compilations
    assert 0 < first <= e.stats().max_compilations
    e.generate(work, params)
    assert e.num_compilations == first, "the same workload compiled again"
    e.generate(prompts(12, seed=6, lo=1, hi=100), params)
    assert e.num_compilations <= e.stats().max_compilations


def test_preemption_when_pool_runs_out_keeps_outputs(tiny_ckpt, make_engine):
    """Guards against wrong tokens or leaked pages when decode runs out of pages and must recompute."""
    ps = prompts(6, seed=7, lo=8, hi=20)
    params = dataclasses.replace(GREEDY, max_new_tokens=24)
    ref = make_engine(tiny_ckpt).generate(ps, params)
    small = make_engine(tiny_ckpt, num_pages=24, chunk_size=16)
    got = small.generate(ps, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert small.stats().num_preemptions > 0, "the scenario did not exercise preemption"


def test_max_new_tokens_and_stop_strings(tiny_ckpt, make_engine):
    """Guards against off-by-one generation lengths and stop strings leaking into the output."""
    e = make_engine(tiny_ckpt)
    p = prompts(1, seed=8, lo=5, hi=6)[0]
    full = e.generate([p], dataclasses.replace(GREEDY, max_new_tokens=20))[0]
    assert len(full.token_ids) == 20 and full.finish_reason == "length"
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop, "tiny model produced no text"
    cut = e.generate([p], dataclasses.replace(GREEDY, max_new_tokens=20, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)]
    assert stop not in cut.text


def test_stream_deltas_concatenate_to_text(tiny_ckpt, make_engine):
    """Guards against streamed text that differs from the final text (lost or repeated deltas)."""
    e = make_engine(tiny_ckpt)
    p = prompts(1, seed=9)[0]
    text = e.generate([p], dataclasses.replace(GREEDY, max_new_tokens=24))[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop, "tiny model produced no text"
    for params in (GREEDY, dataclasses.replace(GREEDY, max_new_tokens=24, stop=[stop])):
        want = e.generate([p], params)[0].text
        assert "".join(e.stream(p, params)) == want


def test_seeds_and_temperature(tiny_ckpt, make_engine):
    """Guards against seeds that do not reproduce, sampling that ignores temperature, and batch
    composition leaking into a seeded sample."""
    e = make_engine(tiny_ckpt)
    p = prompts(1, seed=10)[0]
    hot = SamplingParams(max_new_tokens=16, temperature=1.5, seed=123, ignore_eos=True)
    a = e.generate([p], hot)[0].token_ids
    b = e.generate([p] + prompts(3, seed=11), hot)[0].token_ids  # same seed, other batch mates
    c = e.generate([p], dataclasses.replace(hot, seed=7))[0].token_ids
    g = e.generate([p], GREEDY)[0].token_ids
    assert a == b
    assert a != c
    assert a[:12] != g
    k1 = e.generate([p], dataclasses.replace(hot, top_k=1))[0].token_ids
    assert k1[:12] == g, "top_k=1 must equal greedy"


def test_logprobs_are_log_probabilities(tiny_ckpt, make_engine):
    """Guards against logprobs of the wrong token or unnormalized scores."""
    e = make_engine(tiny_ckpt)
    out = e.generate([prompts(1, seed=12)[0]], GREEDY)[0]
    assert len(out.logprobs) == len(out.token_ids)
    assert all(lp <= 0 for lp in out.logprobs)


def test_abort_frees_pages(tiny_ckpt, make_engine):
    """Guards against aborted requests keeping their pages."""
    e = make_engine(tiny_ckpt)
    s = e.add_request(prompts(1, seed=13, lo=30, hi=31)[0], dataclasses.replace(GREEDY, max_new_tokens=50))
    for _ in range(3):
        e.step()
    assert e.stats().pages_used > 0
    e.abort(s.request_id)
    e.sync()  # (with overlap: the pages wait for the step in flight, see below)
    assert e.stats().pages_used == 0 and s.finish_reason == "abort"


def test_pages_freed_during_a_step_wait_for_it(tiny_ckpt, make_engine):
    """Guards against handing out a page that a launched step may still write: with
    overlap, pages of a request aborted while its step runs return only once that
    step's results have been read; the aborted request gets no more tokens."""
    e = make_engine(tiny_ckpt)
    assert e.overlap
    s = e.add_request(prompts(1, seed=13, lo=30, hi=31)[0], dataclasses.replace(GREEDY, max_new_tokens=50))
    for _ in range(3):
        e.step()
    n_out, used = len(s.output_ids), e.stats().pages_used
    assert e._inflight is not None and s.num_inflight == 1
    e.abort(s.request_id)
    assert e.stats().pages_used == used, "pages freed while a step that writes them is in flight"
    assert e.step() == [] and len(s.output_ids) == n_out and s.num_inflight == 0
    assert e.stats().pages_used == 0 and not e.has_unfinished()


def test_bad_requests_rejected(tiny_ckpt, make_engine):
    """Guards against invalid sampling values or oversize prompts entering the scheduler."""
    e = make_engine(tiny_ckpt)
    for bad, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                       (dict(top_k=-2), "top_k"), (dict(top_k=2**40), "top_k"),
                       (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=field):
            e.add_request([5, 6], SamplingParams(**bad))
    with pytest.raises(ValueError, match="max_model_len"):
        e.add_request([5] * 600)
    with pytest.raises(ValueError, match="empty"):
        e.add_request([])
    assert not e.has_unfinished()


def test_unrolled_layers_equal_scanned_layers(tiny_ckpt, make_engine):
    """The per-layer weight layout (GPU default) computes what the stacked scan computes."""
    ps = prompts(3, seed=11)
    want = [o.token_ids for o in make_engine(tiny_ckpt, layer_loop="scan").generate(ps, GREEDY)]
    e = make_engine(tiny_ckpt, layer_loop="unroll")
    assert "wq_1" in e.runner.state["layers"] and "wq" not in e.runner.state["layers"]
    assert [o.token_ids for o in e.generate(ps, GREEDY)] == want


def _mixed_workload(e, ps, stop_tok):
    """Requests of every kind joining at staggered steps; returns their outputs."""
    kinds = [dataclasses.replace(GREEDY, max_new_tokens=1),  # finishes on its first token
             dataclasses.replace(GREEDY, max_new_tokens=30),
             SamplingParams(max_new_tokens=25, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True),
             dataclasses.replace(GREEDY, max_new_tokens=40, stop_token_ids=[stop_tok]),
             SamplingParams(max_new_tokens=500, temperature=1.0, seed=3, ignore_eos=True)]  # hits max_model_len
    seqs, pending = [], list(enumerate(ps))
    while pending or e.has_unfinished():
        if pending:
            i, p = pending.pop(0)
            seqs.append(e.add_request(p, dataclasses.replace(kinds[i % len(kinds)])))
        e.step()
    return [(s.output_ids, s.output_logprobs, s.finish_reason, s.text) for s in seqs]


@pytest.mark.parametrize("num_pages", [256, 40])
def test_overlapped_steps_equal_lockstep(tiny_ckpt, make_engine, num_pages):
    """Guards against the overlapped engine (step N+1 launched before step N's tokens are
    read, fed from the device) feeding a wrong or stale token, drawing with the wrong
    sample counter, running past a length limit, or losing tokens around preemption: its
    outputs (tokens, logprobs, finish reasons, text) equal the lockstep engine's."""
    ps = prompts(10, seed=21, lo=5, hi=40)
    ps[4] = prompts(1, seed=22, lo=100, hi=101)[0]  # near max_model_len (128 here)
    probe = make_engine(tiny_ckpt, overlap_schedule=False).generate([ps[3]], GREEDY)[0].token_ids
    stop_tok = probe[5]
    kw = dict(num_pages=num_pages, max_model_len=128)
    ref_e = make_engine(tiny_ckpt, overlap_schedule=False, **kw)
    ref = _mixed_workload(ref_e, ps, stop_tok)
    e = make_engine(tiny_ckpt, **kw)
    got = _mixed_workload(e, ps, stop_tok)
    assert e.overlap and not ref_e.overlap
    for x in (e, ref_e):  # a token fed from the device must not add an executable per shape
        assert x.num_compilations <= x.stats().max_compilations
    for r, g in zip(ref, got):
        assert g[0] == r[0] and g[2:] == r[2:]
        # (with preemption the two modes batch differently: other shapes, other GEMM
        # kernels; on a GPU that moves f32 logprobs by ~1e-4)
        np.testing.assert_allclose(g[1], r[1], rtol=1e-3, atol=1e-4)
    assert ref[3][2] == "stop" and ref[4][2] == "length" and len(ref[0][0]) == 1
    if num_pages == 40:
        assert e.stats().num_preemptions > 0, "the scenario did not exercise preemption"


def test_overlap_preempts_no_more_than_lockstep(tiny_ckpt, make_engine):
    """Guards against a preemption cascade under overlap: the preempted sequence's pages
    wait for the step in flight, so if the step being scheduled could not reuse them, each
    preemption freed nothing usable and the whole batch was preempted (27 vs 6 here)."""
    ps = prompts(8, seed=30, lo=8, hi=9)
    params = dataclasses.replace(GREEDY, max_new_tokens=40)
    counts, outs = [], []
    for overlap in (False, True):
        e = make_engine(tiny_ckpt, num_pages=41, overlap_schedule=overlap)
        outs.append([o.token_ids for o in e.generate(ps, params)])
        counts.append(e.stats().num_preemptions)
    assert counts[0] > 0, "the scenario did not exercise preemption"
    assert counts[1] <= counts[0] + 2, f"overlap preempted {counts[1]} times, lockstep {counts[0]}"
    assert outs[0] == outs[1]


def test_stream_leaves_other_requests_tokens_for_the_next_step(tiny_ckpt, make_engine):
    """Guards against a driver (server loop) never hearing that a request finished while
    Engine.stream stepped the engine for another one: the next step() reports it."""
    e = make_engine(tiny_ckpt)
    other = e.add_request(prompts(1, seed=40)[0], dataclasses.replace(GREEDY, max_new_tokens=3))
    for _ in e.stream(prompts(1, seed=41)[0], dataclasses.replace(GREEDY, max_new_tokens=10)):
        pass
    assert other.is_finished
    assert other in e.step()
    assert not e.seqs, "a finished request stayed in the engine's table"


def test_finished_requests_leave_the_engine_by_themselves(tiny_ckpt, make_engine):
    """Guards against a finished (or aborted) request staying in the engine's table until a
    driver remembers to drop it (every driver once popped ``engine.seqs`` by hand), and
    against an id that cannot be used again after its request ended."""
    e = make_engine(tiny_ckpt)
    a = e.add_request(prompts(1, seed=50)[0], dataclasses.replace(GREEDY, max_new_tokens=3), request_id="x")
    b = e.add_request(prompts(1, seed=51)[0], dataclasses.replace(GREEDY, max_new_tokens=30))
    while not a.is_finished:
        e.step()
    assert "x" not in e.seqs and e.abort("x") is None
    assert e.abort(b.request_id) is b and b.finish_reason == "abort"
    e.sync()
    assert not e.seqs and e.stats().idle
    e.generate([prompts(1, seed=52)[0]], GREEDY)
    again = e.add_request([5, 6], GREEDY, request_id="x")
    e.run_until_done()
    assert again.is_finished and not e.seqs
