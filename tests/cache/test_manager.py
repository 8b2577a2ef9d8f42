"""The CacheManager (toolkit/cache/manager.py) on its own: every way a page leaves and comes
back (requests, steps in flight, reservations for transfers, holds after failed ones, the
prefix cache), with the integrity check after each operation. No model, no JAX: each page
records the tokens "written" into it, so a page handed to two owners is caught by content,
not only by counts."""

from __future__ import annotations

import random

import pytest

from toolkit.cache.manager import CacheManager

S = 4


class Driver:
    """Plays the scheduler and the decode role against one manager."""

    def __init__(self, rng: random.Random, num_pages: int = 48):
        self.rng, self.kv = rng, CacheManager(num_pages, S, "radix", seed=b"test")
        self.content: dict[int, tuple] = {}
        self.live: dict[int, dict] = {}  # request id -> tokens, pages, node
        self.step = 0
        self.touched: set[int] = set()  # pages the step in flight may read or write
        self._ids = 0

    def allocate(self, n: int) -> list[int]:
        pages = self.kv.allocate(n)
        assert not set(pages) & self.touched, "handed out a page the step in flight still uses"
        return pages

    def write(self, pages, tokens, first_page: int) -> None:
        for j, p in enumerate(pages):
            i = first_page + j
            self.content[p] = tuple(tokens[i * S:(i + 1) * S])

    def admit(self, tokens: list[int]) -> None:
        node, cached = self.kv.match(tokens[:-1])
        for i, p in enumerate(cached):
            assert self.content[p] == tuple(tokens[i * S:(i + 1) * S]), "a matched page holds other tokens"
        need = -(-len(tokens) // S) - len(cached)
        if not self.kv.can_allocate(need):
            return self.kv.unlock_now(node)
        new = self.allocate(need)
        self.write(new, tokens, len(cached))
        self._ids += 1
        self.live[self._ids] = dict(tokens=list(tokens), pages=cached + new, node=node)

    def launch(self) -> None:
        """A step is in flight until ``collect``: releases wait for it."""
        self.step += 1
        self.kv.inflight_step = self.step
        self.touched = {p for r in self.live.values() for p in r["pages"]}

    def collect(self) -> None:
        self.kv.step_done(self.step)
        self.touched = set()

    def commit(self, rid: int) -> None:
        """The prompt is computed: its whole pages enter the tree (commit_prompts)."""
        r = self.live[rid]
        r["pages"], r["node"] = self.kv.commit(r["tokens"][:-1], r["pages"], r["node"])

    def finish(self, rid: int, keep: bool) -> None:
        r = self.live.pop(rid)
        for i, p in enumerate(r["pages"]):
            assert self.content[p] == tuple(r["tokens"][i * S:(i + 1) * S]), "a live page was overwritten"
        self.kv.release(r["tokens"][:-1], r["pages"], r["node"], keep=keep)

    def reserve(self, owner: int) -> None:
        n = self.rng.randrange(1, 6)
        if self.kv.can_allocate(n):
            pages = self.kv.reserve(owner, n)
            assert not set(pages) & self.touched, "reserved a page the step in flight still uses"
            self.write(pages, [1000 + owner] * (n * S), 0)  # "prefill writes" them

    def check(self) -> None:
        self.kv.check([r["pages"] for r in self.live.values()])
        c = self.kv.cache
        assert c.num_evictable + c.num_locked == c.num_pages


@pytest.mark.parametrize("seed", range(3))
def test_random_operations_account_for_every_page(seed):
    """Guards against a page in two places or none (tree + free + live + reserved + deferred
    + held = the pool), a deferred page freed before its step is collected, a held page freed
    before its peer confirms or its time passes, a request's page overwritten, and
    locks that do not return to zero: thousands of random operations, checked after each."""
    rng = random.Random(seed)
    d = Driver(rng)
    prefixes = [[rng.randrange(40) for _ in range(rng.randrange(2, 20))] for _ in range(5)]
    owners = 0
    for _ in range(2500):
        op = rng.random()
        if op < 0.3 or not d.live:
            base = rng.choice(prefixes)
            d.admit(base[:rng.randrange(1, len(base) + 1)] + [rng.randrange(40) for _ in range(rng.randrange(1, 8))])
        elif op < 0.38:
            d.commit(rng.choice(list(d.live)))
        elif op < 0.48:
            d.finish(rng.choice(list(d.live)), keep=rng.random() < 0.8)
        elif op < 0.6:
            d.launch() if d.kv.inflight_step is None else d.collect()
        elif op < 0.7:
            owners += 1
            d.reserve(owners)
        elif op < 0.8 and d.kv._reserved:
            owner = rng.choice(list(d.kv._reserved))
            if rng.random() < 0.5:
                d.kv.unreserve(owner, hold_s=rng.choice([0.0, 1e-4, 60.0]))
            else:  # the transfer succeeded: a request owns the pages
                node, _ = d.kv.match([])  # (decode matched its prompt, here empty, before reserving)
                pages, _ = d.kv.claim(owner)
                d._ids += 1
                d.live[d._ids] = dict(tokens=[1000 + owner] * (len(pages) * S), pages=pages, node=node)
        elif op < 0.9 and d.kv._held.owners():
            d.kv.end_hold(rng.choice(d.kv._held.owners()))
        else:
            d.kv.expire_holds()
        d.check()
    for rid in list(d.live):
        d.finish(rid, keep=True)
    for owner in list(d.kv._reserved):
        d.kv.unreserve(owner)
    for owner in d.kv._held.owners():
        d.kv.end_hold(owner)
    d.collect()
    d.check()
    assert d.kv.cache.num_locked == 0
    d.kv.flush()
    assert d.kv.all_free() and d.kv.num_held == 0


def test_held_pages_return_only_when_confirmed_or_expired():
    """Guards against a failed transfer's pages going back to the allocator while the peer
    may still write them (the decode role's quarantine), and against holds that never end."""
    kv = CacheManager(16, S)
    kv.reserve("a", 3)
    kv.reserve("b", 2)
    kv.unreserve("a", hold_s=60.0)
    kv.unreserve("b", hold_s=1e-6)
    assert kv.num_free == 15 - 5 and kv.num_held == 5 and kv.holds("a")
    kv.expire_holds()  # b's time passed, a's did not
    assert kv.num_held == 3 and not kv.holds("b")
    kv.inflight_step = 7  # a step in flight: the confirmed pages still wait for it
    assert kv.end_hold("a") and not kv.end_hold("a")
    assert kv.num_free == 12 and kv.num_held == 0
    kv.step_done(7)
    assert kv.all_free()
