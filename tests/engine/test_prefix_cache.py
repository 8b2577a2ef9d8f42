"""cache=radix on the unified engine against cache=none: the same tokens, fewer computed.

Every scenario checks the page accounting after each step (free + cached + requests' +
deferred = the pool, each page once) and, at the end (the make_engine fixture), that no
lock is left and a flush gives every page back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from toolkit.engine.request import SamplingParams

CFG = dict(max_model_len=256, chunk_size=32, max_prefill_seqs=4, max_batch_size=8, page_size=4)


def conversations(n: int, turns: int, seed: int, system_len: int = 21):
    """n conversations sharing a system prompt; each turn appends a user message."""
    rng = np.random.default_rng(seed)
    system = [int(t) for t in rng.integers(3, 384, system_len)]
    return system, [[[int(t) for t in rng.integers(3, 384, int(rng.integers(3, 12)))] for _ in range(turns)]
                    for _ in range(n)]


def run_turns(engine, system, convs, max_new: int = 6, check_every_step: bool = True):
    """All conversations advance one turn at a time, concurrently (each turn's requests are
    submitted together and stepped to the end); a turn's prompt is the previous prompt, its
    answer and the next user message. Returns per turn the (output ids, cached tokens)."""
    history = [list(system) for _ in convs]
    out = []
    for t in range(len(convs[0])):
        seqs = []
        for i, conv in enumerate(convs):
            history[i] += conv[t]
            params = SamplingParams(max_new_tokens=max_new + (i % 3), ignore_eos=True)
            seqs.append(engine.add_request(list(history[i]), params))
        while engine.has_unfinished():
            engine.step()
            if check_every_step:
                engine.check_pages()
        engine.sync()
        engine.check_pages()
        for i, s in enumerate(seqs):
            history[i] += s.output_ids
        out.append([(list(s.output_ids), s.num_cached) for s in seqs])
    return out


@pytest.mark.parametrize("overlap", [True, False])
def test_multi_turn_equals_no_cache_and_reuses_prefixes(tiny_ckpt, make_engine, overlap):
    """Guards against a cached prefix changing any output (a wrong page mapped in, a page
    freed or evicted while still read, a prefix matched past what was written), against a
    cache that never hits, and against the last prompt token being skipped (its logits give
    the first token): 5 conversations x 4 turns, concurrent, greedy."""
    system, convs = conversations(5, 4, seed=1)
    ref = run_turns(make_engine(tiny_ckpt, overlap_schedule=overlap, **CFG), system, convs)
    eng = make_engine(tiny_ckpt, cache="radix", overlap_schedule=overlap, **CFG)
    got = run_turns(eng, system, convs)
    assert [[o for o, _ in turn] for turn in got] == [[o for o, _ in turn] for turn in ref]
    assert all(c == 0 for turn in ref for _, c in turn)
    # turn 1: the system prompt (21 tokens -> 5 whole pages) is found by the requests admitted
    # after the first one's prompt is computed (the second shares its prefill step: no hit)
    first = [c for _, c in got[0]]
    assert first[0] == 0 and first.count(20) >= 3, first
    for t in range(1, 4):  # later turns: the previous turn's prompt and answer, in whole pages
        for i, (_, c) in enumerate(got[t]):
            prev_len = len(system) + sum(len(convs[i][k]) for k in range(t)) + sum(len(got[k][i][0]) for k in range(t))
            assert c >= (prev_len - 1) // 4 * 4 - 4, (t, i, c, prev_len)
    st = eng.stats()
    assert st.pages_cached > 0 and st.pages_evictable == st.pages_cached


def test_eviction_under_pressure_equals_no_cache(tiny_ckpt, make_engine):
    """Guards against eviction handing out a page a request still reads (its lock ignored),
    evicting locked pages, or a full pool hanging instead of evicting: a pool too small
    for the working set, 8 conversations x 4 turns, page accounting after every step."""
    system, convs = conversations(8, 4, seed=2)
    kw = {**CFG, "num_pages": 96}
    ref = run_turns(make_engine(tiny_ckpt, **kw), system, convs, check_every_step=False)
    eng = make_engine(tiny_ckpt, cache="radix", **kw)
    got = run_turns(eng, system, convs)
    assert [[o for o, _ in turn] for turn in got] == [[o for o, _ in turn] for turn in ref]
    assert any(c > 0 for turn in got[1:] for _, c in turn)
    assert eng.stats().pages_evicted > 0


def test_preempted_request_recomputes_from_its_cached_pages(tiny_ckpt, make_engine):
    """Guards against a preempted request's KV being thrown away with a cache on (its
    recompute should start from what it committed) or the recompute giving other tokens."""
    ps = [[int(t) for t in np.random.default_rng(i).integers(3, 384, 30)] for i in range(6)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    kw = {**CFG, "num_pages": 48}
    ref_e = make_engine(tiny_ckpt, **kw)
    ref = [o.token_ids for o in ref_e.generate(ps, [dataclasses.replace(params) for _ in ps])]
    eng = make_engine(tiny_ckpt, cache="radix", **kw)
    got = [o.token_ids for o in eng.generate(ps, [dataclasses.replace(params) for _ in ps])]
    assert eng.stats().num_preemptions > 0 and ref_e.stats().num_preemptions > 0
    assert got == ref


def test_aborted_request_adds_nothing_and_identical_prompts_share_pages(tiny_ckpt, make_engine):
    """Guards against an aborted request's generated KV entering the cache (its prompt was
    committed once computed; what it decoded after is dropped with it), and against two
    requests admitted together with the same prompt keeping two copies after both computed
    it (the second's duplicates must be freed and its page list remapped to the tree's)."""
    eng = make_engine(tiny_ckpt, cache="radix", **CFG)
    prompt = [int(t) for t in np.random.default_rng(5).integers(3, 384, 23)]
    s = eng.add_request(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True))
    while len(s.output_ids) < 12:
        eng.step()
    eng.abort(s.request_id)
    eng.sync()
    eng.check_pages()
    assert eng.stats().pages_cached == 5, "the aborted request cached more than its prompt's pages"
    eng.flush_cache()
    a, b = (eng.add_request(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True)) for _ in range(2))
    while not (a.output_ids and b.output_ids):  # both prompts computed (b's in a later chunk)
        eng.step()
    assert eng.page_table(a.request_id)[:5] == eng.page_table(b.request_id)[:5], "two copies of one prefix"
    eng.run_until_done()
    eng.sync()
    assert a.output_ids == b.output_ids
    assert eng.stats().pages_cached == 6  # 23 prompt + 2 committed output tokens -> 6 whole pages


def test_warmup_puts_nothing_in_the_cache(tiny_ckpt, make_engine):
    """Guards against warm-up's padding steps entering the tree (a real request would then
    'hit' KV that no request computed): after warm-up the cache is empty, and a request
    finds zero cached tokens."""
    eng = make_engine(tiny_ckpt, cache="radix", shape_buckets="compact", max_model_len=64, max_batch_size=4,
                      chunk_size=16, max_prefill_seqs=2, page_size=4, num_pages=64)
    assert eng.warmup(force=True, progress=False).shapes > 0
    assert eng.stats().pages_cached == 0
    s = eng.add_request([0] * 20, SamplingParams(max_new_tokens=2, ignore_eos=True))  # page 0's padding tokens
    eng.run_until_done()
    assert s.num_cached == 0 and eng.stats().cached_tokens == 0
