"""The router's approximate prefix index and the cache-aware pick, without processes."""

from __future__ import annotations

import dataclasses

from serve.prefix_index import PrefixIndex, block_keys, pick_cache_aware


@dataclasses.dataclass
class W:
    name: str
    in_flight: int = 0
    index: PrefixIndex = dataclasses.field(default_factory=lambda: PrefixIndex(block=4))


def test_keys_name_prefixes_and_match_counts_whole_blocks():
    """Guards against a block key that ignores what came before it (two conversations
    sharing a later block but not the start would look cached) and a partial block counted."""
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 5, 6, 7, 8]
    assert block_keys(a, 4)[1] != block_keys(b, 4)[1]
    idx = PrefixIndex(block=4)
    idx.insert(a + [1, 2])
    assert idx.match(a + [0, 0, 0, 0]) == 8 and idx.match(b) == 0 and idx.match(a[:7]) == 4
    small = PrefixIndex(block=4, capacity=2)
    small.insert(a)
    small.insert(b)  # LRU: a's keys went first
    assert len(small) == 2 and small.match(a) == 0 and small.match(b) == 8


def test_pick_follows_the_prefix_unless_overloaded():
    """Guards against cache-aware routing sending a conversation's next turn away from the
    worker that holds it, or piling everything on that worker past the margin."""
    x, y = W("x"), W("y")
    turn1 = list(range(20))
    x.index.insert(turn1)
    assert pick_cache_aware([x, y], turn1 + [7, 7], margin=2) is x
    x.in_flight = 3  # beyond least loaded (0) + margin 2: fall back
    assert pick_cache_aware([x, y], turn1 + [7, 7], margin=2) is y
    x.in_flight = 2
    assert pick_cache_aware([x, y], turn1, margin=2) is x
    assert pick_cache_aware([x, y], [50] * 12, margin=2) is y  # no hit anywhere: least loaded
    x.in_flight = y.in_flight = 0  # no hit, equal load: the counter spreads them
    assert {pick_cache_aware([x, y], [50] * 12, margin=2, start=s).name for s in range(2)} == {"x", "y"}


def test_a_burst_spreads_and_cancelled_requests_release_their_workers():
    """Guards against the router counting a request against its workers only once its task
    first runs (a burst picked in one go all saw the same loads and went to one worker) and
    against a request cancelled before its task started never giving its count back."""
    import asyncio

    from serve.router import RouterBackend
    from toolkit.engine.request import SamplingParams
    from toolkit.models.random_init import byte_tokenizer

    async def burst():
        rb = RouterBackend(byte_tokenizer(), "m", 64, ["http://p"], ["http://d0", "http://d1"], policy="least_loaded")
        for w in (*rb.workers["prefill"], *rb.workers["decode"]):
            w.healthy, w.control = True, "tcp://x"
        for i in range(4):
            await rb.start([1, 2, 3], SamplingParams(), f"r{i}")
        counts = [w.in_flight for w in rb.workers["decode"]]
        for i in range(4):
            await rb.abort(f"r{i}")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return counts, [w.in_flight for w in (*rb.workers["prefill"], *rb.workers["decode"])], rb._tasks

    counts, after, tasks = asyncio.run(burst())
    assert counts == [2, 2] and after == [0, 0, 0] and not tasks
