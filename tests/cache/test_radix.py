"""The page-granular radix tree (toolkit/cache/radix.py) on its own: no model, no JAX.

A simulated pool stands in for the KV: each page records the tokens "written" into it, so a
match that returns a page holding other tokens (a wrong split, a stale page after eviction,
a duplicate kept instead of the tree's copy) is caught, not only a count that drifts."""

from __future__ import annotations

import random

import pytest

from toolkit.cache.allocator import PageAllocator
from toolkit.cache.radix import RadixCache, hash_seed, page_hash

S = 4  # page size


class Sim:
    """The manager's side of the protocol (module docstring of radix.py) over a real
    allocator; ``content[page]`` is what the page holds."""

    def __init__(self, num_pages: int):
        self.alloc = PageAllocator(num_pages)
        self.tree = RadixCache(S, seed=hash_seed("sim", S))
        self.content: dict[int, tuple[int, ...]] = {}
        self.live: dict[int, dict] = {}  # request id -> {tokens, pages, node}
        self._ids = 0

    def allocate(self, n: int) -> list[int] | None:
        if not self.alloc.can_allocate(n):
            self.alloc.free(self.tree.evict(n - self.alloc.num_free))
        return self.alloc.allocate(n) if self.alloc.can_allocate(n) else None

    def start(self, tokens: list[int]) -> int | None:
        """Admit a request: match, lock, allocate and 'compute' the pages past the match."""
        m = self.tree.match(tokens[:-1])  # the last token is always computed (its logits)
        self.tree.lock(m.node)
        for i, p in enumerate(m.pages):
            assert self.content[p] == tuple(tokens[i * S:(i + 1) * S]), "a matched page holds other tokens"
        need = -(-len(tokens) // S) - m.num_pages
        new = self.allocate(need)
        if new is None:  # no room: undo (the lock must balance)
            self.tree.unlock(m.node)
            return None
        for j, p in enumerate(new):
            i = m.num_pages + j
            self.content[p] = tuple(tokens[i * S:(i + 1) * S])
        self._ids += 1
        self.live[self._ids] = dict(tokens=list(tokens), pages=m.pages + new, node=m.node)
        return self._ids

    def commit(self, rid: int, extra: list[int]) -> None:
        """Generated tokens: their KV (and the previous last token's) is written; insert the
        committed whole pages. Out of pages: the request ends with what it has."""
        r = self.live[rid]
        old = len(r["tokens"])
        need = -(-(old + len(extra)) // S) - len(r["pages"])
        new = self.allocate(need) if need > 0 else []
        if new is None:
            return self.finish(rid)
        r["tokens"] += extra
        r["pages"] += new
        tree = set(self.tree.pages())
        for i in range((old - 1) // S, len(r["pages"])):  # pages written now: never the tree's
            assert r["pages"][i] not in tree, "a write into a page the tree holds"
            self.content[r["pages"][i]] = tuple(r["tokens"][i * S:(i + 1) * S])
        self._insert(r)

    def _insert(self, r: dict) -> int:
        """Insert the committed KV (all but the last token); the request's page list is
        remapped to the tree's pages and its lock moves to the new node. Returns the
        number of its pages the tree now holds."""
        res = self.tree.insert(r["tokens"][:-1], r["pages"])
        self.alloc.free(res.duplicates)
        r["pages"] = res.pages + r["pages"][len(res.pages):]
        self.tree.lock(res.node)
        self.tree.unlock(r["node"])
        r["node"] = res.node
        return len(res.pages)

    def finish(self, rid: int) -> None:
        r = self.live.pop(rid)
        n = self._insert(r)
        self.alloc.free(r["pages"][n:])  # the partial tail page never enters the tree
        self.tree.unlock(r["node"])

    def check(self) -> None:
        """tree + free + live (not in the tree) = every usable page, disjoint."""
        self.tree.check()
        tree = self.tree.pages()
        live = [p for r in self.live.values() for p in r["pages"] if p not in set(tree)]
        free = list(self.alloc._free)
        everything = tree + live + free
        assert len(everything) == len(set(everything)) == self.alloc.num_usable, \
            (len(tree), len(live), len(free), self.alloc.num_usable)
        assert self.tree.num_locked <= self.tree.num_pages


def test_chained_hashes_name_prefixes_not_pages():
    """Guards against a page key that ignores what came before (two prompts sharing a page
    but not its prefix would share KV) or the model/layout seed."""
    a = page_hash(hash_seed("m", 4), [1, 2, 3, 4])
    assert page_hash(hash_seed("m", 4), [1, 2, 3, 4]) == a
    assert page_hash(hash_seed("other", 4), [1, 2, 3, 4]) != a
    assert page_hash(a, [5, 6, 7, 8]) != page_hash(hash_seed("m", 4), [5, 6, 7, 8])


def test_match_insert_split_and_duplicates():
    """Guards against matching a partial page, splitting off the page grid, and keeping a
    request's duplicate pages instead of returning them for freeing."""
    t = RadixCache(S)
    r = t.insert(list(range(10)), [1, 2, 3])  # 10 tokens: 2 whole pages; page 3 stays out
    assert r.pages == [1, 2] and r.duplicates == [] and t.num_pages == 2
    assert t.match(list(range(7))).pages == [1]  # 7 tokens: one whole page
    assert t.match(list(range(8))).pages == [1, 2]
    assert t.match([0, 1, 2, 9, 9]).pages == []
    r = t.insert(list(range(4)) + [7, 7, 7, 7, 8, 8, 8, 8], [5, 6, 7])  # shares page 0: a split
    assert r.pages == [1, 6, 7] and r.duplicates == [5]
    t.check()
    assert t.match(list(range(8))).pages == [1, 2] and t.num_pages == 4
    m = t.match([0, 1, 2, 3, 7, 7, 7, 7])
    t.lock(m.node)
    assert t.num_locked == 2 and sorted(t.evict(10)) == [2, 7]  # the locked path stays
    t.unlock(m.node)
    t.check()
    assert sorted(t.evict(10)) == [1, 6] and t.num_pages == 0
    with pytest.raises(AssertionError, match="unlock without a matching lock"):
        t.unlock(m.node)


def test_empty_match_lock_balances():
    """Guards against an empty match that is not locked, or whose unlock underflows (the
    lock-count underflow SGLang's decode-side cache had)."""
    t = RadixCache(S)
    m = t.match([1, 2])
    assert m.pages == [] and m.node is t.root
    t.lock(m.node)
    t.unlock(m.node)
    t.check()
    with pytest.raises(AssertionError):
        t.unlock(m.node)


def test_lru_evicts_least_recent_leaf_first():
    """Guards against evicting a prefix that was just used while a stale one stays."""
    t = RadixCache(S)
    t.insert([1] * 8, [1, 2])
    t.insert([2] * 8, [3, 4])
    t.match([1] * 8)  # touch the first: the second is now older
    assert t.evict(1) == [3, 4]
    assert t.match([1] * 8).pages == [1, 2]


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_keep_every_invariant(seed):
    """Guards against any sequence of match / lock / insert / unlock / evict leaving a page
    in two places or none (tree + free + live = the pool), counts that drift (evictable +
    locked = pages in the tree), a matched page holding other tokens, or locks that do not
    return to zero: thousands of random operations, the integrity check after each."""
    rng = random.Random(seed)
    sim = Sim(num_pages=64)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 24))] for _ in range(6)]
    started = 0
    for _ in range(2500):
        op = rng.random()
        if op < 0.35 or not sim.live:
            base = rng.choice(prefixes)
            tokens = base[:rng.randrange(1, len(base) + 1)] + [rng.randrange(50) for _ in range(rng.randrange(0, 9))]
            if sim.start(tokens or [1]) is not None:
                started += 1
        elif op < 0.75:
            sim.commit(rng.choice(list(sim.live)), [rng.randrange(50) for _ in range(rng.randrange(1, 6))])
        elif op < 0.95:
            sim.finish(rng.choice(list(sim.live)))
        else:
            sim.alloc.free(sim.tree.evict(rng.randrange(1, 8)))
        sim.check()
    assert started > 300
    for rid in list(sim.live):
        sim.finish(rid)
    sim.check()
    assert sim.tree.num_locked == 0 and all(n.lock == 0 for n in sim.tree._nodes() if n is not sim.tree.root)
    sim.alloc.free(sim.tree.evict(sim.tree.num_pages))
    assert sim.tree.num_pages == 0 and sim.alloc.all_free()
