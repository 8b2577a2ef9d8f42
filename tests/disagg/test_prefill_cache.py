"""cache=radix on the prefill role, through a P/D pair on both backends: the same tokens as
the unified engine without a cache, and later turns computing only what is new."""

from __future__ import annotations

import pytest

from tests.engine.test_prefix_cache import conversations
from toolkit.engine.request import SamplingParams

pytestmark = pytest.mark.timeout(300)


def pd_turns(pair, ref, system, convs, measure):
    """Every conversation advances a turn at a time, its requests concurrent through
    ``pair``; each turn's tokens must equal ``ref``'s (an engine without a cache) and every
    page of both workers must be accounted for. Returns per turn (the growth of
    ``measure()`` over the turn, the prompts' total pages)."""
    history = [list(system) for _ in convs]
    out = []
    for t in range(len(convs[0])):
        for i, conv in enumerate(convs):
            history[i] += conv[t]
        params = [SamplingParams(max_new_tokens=5 + i, ignore_eos=True) for i in range(len(convs))]
        want = [o.token_ids for o in ref.generate([list(h) for h in history], params)]
        before = measure()
        got = pair.generate([list(h) for h in history], params)
        assert all(not isinstance(o, str) for o in got), got
        assert [o.token_ids for o in got] == want, f"turn {t}"
        out.append((measure() - before, sum(-(-len(h) // 4) for h in history)))
        pair.prefill.engine.check_pages()
        pair.decode.engine.check_pages()
        for i, o in enumerate(got):
            history[i] += o.token_ids
    return out


def test_multi_turn_through_pd_with_a_prefill_cache(tiny_ckpt, make_engine, make_pair):
    """Guards against the prefill role's cache changing what decode receives (a page of the
    tree sent for another prefix, a page evicted or reused while a transfer still reads it:
    the prefill role commits only once the room's transfers have ended), and against it
    never hitting: 3 conversations x 3 turns, each turn's requests concurrent."""
    system, convs = conversations(3, 3, seed=4)
    pair = make_pair(tiny_ckpt, prefill_cache="radix")
    ref = make_engine(tiny_ckpt, page_size=4, chunk_size=16)
    hits = [m for m, _ in pd_turns(pair, ref, system, convs, lambda: pair.prefill.engine.stats().cached_tokens)]
    # turn 1 may or may not share the system prompt (its requests run together; a room
    # commits once its transfers end); later turns find the whole earlier conversation
    assert hits[1] > 0 and hits[2] > hits[1], hits
    st = pair.prefill.engine.stats()
    assert st.pages_cached > 0 and st.pages_evictable == st.pages_cached
