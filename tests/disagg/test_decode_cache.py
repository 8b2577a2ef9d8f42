"""The decode-side prefix cache through a P/D pair on both backends: decode keeps each
finished conversation's KV, and the next turn asks prefill only for the pages it lacks."""

from __future__ import annotations

import numpy as np
import pytest

from tests.disagg.test_prefill_cache import pd_turns
from tests.engine.test_prefix_cache import conversations
from toolkit.engine.request import SamplingParams

pytestmark = pytest.mark.timeout(300)
S = 4  # tests/disagg/conftest.py PAGE


def pages_moved(pair) -> int:
    return pair.prefill.stats["transfer_bytes"]


def test_multi_turn_sends_only_the_missing_pages(tiny_ckpt, make_engine, make_pair):
    """Guards against the decode-side cache changing any token (a prefix page mapped wrong,
    prefill writing into a page of decode's tree, the checksum covering the wrong pages),
    against later turns moving the whole prompt again, and against locks that do not come
    back: 3 conversations x 4 turns, checksum on, on both backends; page accounting after
    every turn, no lock left at the end (the make_pair fixture flushes and counts)."""
    system, convs = conversations(3, 4, seed=7)
    pair = make_pair(tiny_ckpt, tcfg_kw=dict(checksum=True), decode_cache="radix")
    ref = make_engine(tiny_ckpt, page_size=S, chunk_size=16)
    per_turn = pd_turns(pair, ref, system, convs, lambda: pages_moved(pair))
    page_bytes = per_turn[0][0] / per_turn[0][1]  # turn 1: decode held nothing but the system prompt's pages
    for t, (moved, prompt_pages) in enumerate(per_turn[1:], 1):
        # a turn moves the pages past what decode committed of the previous turn: the new
        # user message, the last answer token's page, and partial pages
        assert moved / page_bytes <= prompt_pages / 2, (t, moved / page_bytes, prompt_pages)
    assert pair.decode.engine.stats().cached_tokens > 0


@pytest.mark.parametrize("max_new", [1, 6])
def test_full_hit_moves_zero_pages_and_still_answers(tiny_ckpt, make_engine, make_pair, max_new):
    """Guards against a full decode-side hit (every prompt page cached) sending no last chunk
    (decode would wait for the aux record forever), sending pages anyway, or answering
    wrongly; max_new_tokens=1 is the aux record alone."""
    pair = make_pair(tiny_ckpt, decode_cache="radix")
    ref = make_engine(tiny_ckpt, page_size=S, chunk_size=16)
    first = [int(t) for t in np.random.default_rng(3).integers(3, 384, 15)]
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    out = pair.generate([first], [params])[0]  # 15 prompt tokens + 1 answer: 16 tokens, 4 pages, 3 committed
    # the next prompt is exactly what decode committed: 12 tokens... plus nothing: a full hit
    prompt = first[:12]
    want = ref.generate([prompt], [SamplingParams(max_new_tokens=max_new, ignore_eos=True)])[0].token_ids
    b0 = pages_moved(pair)
    got = pair.generate([prompt], [SamplingParams(max_new_tokens=max_new, ignore_eos=True)])[0]
    assert not isinstance(got, str), got
    assert got.token_ids == want
    assert pages_moved(pair) == b0, "a full hit moved pages"
    assert not isinstance(out, str)


def test_lock_balance_on_success_and_failure_then_twenty_turns(tiny_ckpt, make_pair):
    """Guards against decode-side locks that leak or underflow (SGLang skipped the lock on an
    empty match and underflowed): partial hit + failed transfer, no hit + failed transfer,
    and successes, then 20 turns of one conversation; after each, no lock is held, every
    page is accounted for, and no failed room's KV entered the tree."""
    pair = make_pair(tiny_ckpt, decode_cache="radix")
    dec = pair.decode.engine
    rng = np.random.default_rng(11)
    convo = [int(t) for t in rng.integers(3, 384, 14)]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)

    def settle():
        while not (pair.prefill.idle() and pair.decode.idle()):
            pair.step()
        st = dec.stats()
        assert st.pages_evictable == st.pages_cached, "a decode-side lock is still held"
        assert st.pages_used == 0
        dec.check_pages()

    out = pair.generate([convo], params)[0]  # no hit + success
    settle()
    cached = dec.stats().pages_cached
    pair.prefill.tcfg.fault_rate = 1.0  # every WRITE fails from here
    try:
        other = [int(t) for t in rng.integers(3, 384, 9)]
        failed = pair.generate([convo + out.token_ids + [5, 6, 7], other], params)  # partial hit, no hit
        assert all(isinstance(o, str) and "fault" in o for o in failed), failed
    finally:
        pair.prefill.tcfg.fault_rate = 0.0
    settle()
    assert dec.stats().pages_cached == cached, "a failed room's KV entered the tree"
    history = convo + out.token_ids
    for turn in range(20):
        history += [int(t) for t in rng.integers(3, 384, 3)]
        got = pair.generate([list(history)], params)[0]
        assert not isinstance(got, str), got
        history += got.token_ids
        settle()
    assert dec.stats().cached_tokens > 20 * 8


def test_eviction_under_pressure_through_pd(tiny_ckpt, make_engine, make_pair):
    """Guards against eviction on either side handing out a page a transfer or a request
    still uses (a reserved page evicted, a prefix page freed while locked), and against a
    full decode pool hanging instead of evicting or waiting: both pools far smaller than
    the working set, both caches on, 8 conversations x 4 turns, checksum on; every answer
    equals the unified engine without a cache, decode's pages accounted after every tick."""
    system, convs = conversations(8, 4, seed=5)
    pair = make_pair(tiny_ckpt, tcfg_kw=dict(checksum=True), prefill_cache="radix", decode_cache="radix",
                     num_pages=48)
    ref = make_engine(tiny_ckpt, page_size=S, chunk_size=16)
    tick = pair.step

    def checked_step():
        tick()
        pair.decode.engine.check_pages()

    pair.step = checked_step
    pd_turns(pair, ref, system, convs, lambda: pages_moved(pair))
    for w in (pair.prefill, pair.decode):
        st = w.engine.stats()
        assert st.cached_tokens > 0 and st.pages_evicted > 0, (w.role, st)
