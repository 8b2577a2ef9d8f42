"""The one owner of KV pages: the allocator, the prefix cache and every deferred release.

Every page of the pool but the padding page is, at any moment, in exactly one of:

- **free**: in the allocator;
- **cached**: in the prefix cache's tree (locked while a request uses it, else evictable);
- **live**: held by a request (its pages past what the tree holds), or reserved for a
  transfer another worker writes (``reserve``, keyed by its owner);
- **deferred**: released while a step in flight may still write it; back to the
  allocator once that step is collected (``step_done``);
- **held**: a reservation whose transfer failed while the peer may still be writing into
  it; back once the peer confirms nothing is in flight (``end_hold``) or the hold's
  deadline passes (``expire_holds``: a dead peer never writes again).

The scheduler and the P/D roles ask this manager for pages (``can_allocate``/``allocate``:
eviction from the tree happens here, when the allocator alone falls short) and give them
back (``free``, ``release``). A request's prefix is matched at admission (``match``: the
match is locked, always, even when empty) and its committed KV enters the tree when its
prompt is computed and when it ends (``commit``/``release``). Under overlapped
scheduling the lock of a released request is dropped, like its pages, only once the step
in flight is collected: until then that step may still read them.

With tiers below the tree (``attach_tiers``: host memory, storage; toolkit/cache/tiers.py)
every page entering the tree is copied down (write-through) and a match continues into
them: the pages found there are loaded into newly allocated device pages and enter the
tree before the match returns. A copy in flight holds a tree lock on the node of the pages
it reads, dropped only once ``poll_copies`` observes it complete, so those pages are never
evicted or handed out while the copy may still read them; a request that finishes
meanwhile drops only its own lock.

Hybrid models also keep per-request recurrent state (toolkit/cache/state_pool.py): its
slots (``num_state_slots``; slot 0 is padding) are this manager's too, with the same
rules: a request takes one at admission (``can_allocate_slot``/``allocate_slot``) or with
its reservation (``reserve(..., state=True)``), and it comes back with the request's pages
(``free``/``release``: deferred while a step in flight may touch it) or is held with a failed
room's pages.
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence as Seq

from toolkit.cache.allocator import PageAllocator
from toolkit.cache.holds import Holds
from toolkit.cache.radix import Node, PrefixCache, RadixCache, page_hash


def make_prefix_cache(policy: str, page_size: int, seed: bytes = b"") -> Optional[PrefixCache]:
    """``cache.policy`` -> the prefix cache (None for ``none``); names in policies.py."""
    if policy == "none":
        return None
    if policy == "radix":
        return RadixCache(page_size, seed)
    raise ValueError(f"cache.policy={policy!r}; allowed: none, radix")


class CacheManager:
    def __init__(self, num_pages: int, page_size: int, policy: str = "none", seed: bytes = b"",
                 num_state_slots: int = 0):
        self.page_size = page_size
        self._alloc = PageAllocator(num_pages)
        # state slots of a model with recurrent layers (an id allocator like the pages': slot 0
        # is padding), or None; a request of a model without state has slot 0
        self._slots = PageAllocator(num_state_slots) if num_state_slots else None
        self.cache = make_prefix_cache(policy, page_size, seed)
        self.inflight_step: Optional[int] = None  # newest launched step whose results are unread
        # (step it waits for, pages to free, cache nodes to unlock, state slots to free)
        self._deferred: list[tuple[int, list[int], list[Node], list[int]]] = []
        self._reserved: dict[Hashable, list[int]] = {}  # owner -> pages another worker writes
        self._reserved_slot: dict[Hashable, int] = {}  # owner -> the state slot it writes too
        # owner -> (pages, state slots) of a failed transfer, until confirmed or expired
        self._held = Holds()
        self.num_evicted = 0  # cached pages evicted to satisfy an allocation, so far
        self.tiers = None  # KVTiers below the tree (attach_tiers), or None

    def attach_tiers(self, tiers) -> None:
        """Host (and storage) tiers below the tree; needs a prefix cache."""
        assert self.cache is not None, "tiers need a prefix cache"
        self.tiers = tiers

    def poll_copies(self, block: bool = False) -> int:
        """Observe the tier copies in flight (every step): the device pages of those that
        ended are unpinned. ``block``: wait for all of them. Returns how many ended."""
        if self.tiers is None:
            return 0
        ended = self.tiers.drain() if block else self.tiers.poll()
        for c in ended:
            self.cache.unlock(c.node)
        return len(ended)

    def close(self) -> None:
        """Wait for the copies in flight and close the storage tier (its index is on disk)."""
        if self.tiers is not None:
            self.poll_copies(block=True)
            self.tiers.close()

    # ---- counts -------------------------------------------------------------------

    @property
    def num_usable(self) -> int:
        return self._alloc.num_usable

    @property
    def num_free(self) -> int:
        """Pages in the allocator (not counting evictable cached pages)."""
        return self._alloc.num_free

    @property
    def num_cached(self) -> int:
        return self.cache.num_pages if self.cache is not None else 0

    @property
    def num_evictable(self) -> int:
        return self.cache.num_evictable if self.cache is not None else 0

    @property
    def num_held(self) -> int:
        """Pages of failed transfers' reservations, waiting until no write can land."""
        return sum(len(p) for p, _ in self._held.items())

    @property
    def num_used(self) -> int:
        """Pages held by requests, reservations, holds or deferred releases (not the cache's)."""
        return self.num_usable - self.num_free - self.num_cached

    def all_free(self) -> bool:
        """Every usable page (and state slot) in its allocator (after ``flush``, at rest)."""
        return self._alloc.all_free() and (self._slots is None or self._slots.all_free())

    # ---- state slots (models with recurrent layers) ---------------------------------

    @property
    def has_state(self) -> bool:
        return self._slots is not None

    @property
    def num_state_slots(self) -> int:
        """Usable state slots (not counting the padding slot); 0 without state."""
        return self._slots.num_usable if self._slots is not None else 0

    @property
    def num_free_slots(self) -> int:
        return self._slots.num_free if self._slots is not None else 0

    def can_allocate_slot(self) -> bool:
        """A request may be admitted (always, without state)."""
        return self._slots is None or self._slots.can_allocate(1)

    def allocate_slot(self) -> int:
        """A state slot for a new request (its state starts from zeros at position 0: the
        slot is not cleared); 0 without state."""
        return self._slots.allocate(1)[0] if self._slots is not None else 0

    # ---- pages ----------------------------------------------------------------------

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free + self.num_evictable

    def allocate(self, n: int) -> list[int]:
        """``n`` pages, evicting unlocked cached pages (least recently used first) when the
        allocator alone falls short. Evicted pages are no request's (locks pin every page
        a request or a step in flight uses), so they are free at once."""
        assert self.can_allocate(n), f"asked for {n} pages, {self.num_free} free + {self.num_evictable} evictable"
        short = n - self.num_free
        if short > 0:
            self._alloc.free(self.cache.evict(short))
            self.num_evicted += short
        return self._alloc.allocate(n)

    def free(self, pages: Seq[int], unlock: Seq[Node] = (), slot: int = 0) -> None:
        """Give pages (and a state slot; 0: none) back and drop cache locks now, or once the
        step in flight, which may still touch them, is collected."""
        slots = [slot] if slot else []
        if self.inflight_step is None:
            self._release_now(pages, unlock, slots)
        elif pages or unlock or slots:
            self._deferred.append((self.inflight_step, list(pages), list(unlock), slots))

    def _release_now(self, pages: Seq[int], unlock: Seq[Node], slots: Seq[int] = ()) -> None:
        self._alloc.free(list(pages))
        if slots:
            self._slots.free(list(slots))
        for node in unlock:
            self.cache.unlock(node)

    def has_deferred_page(self) -> bool:
        return any(pages for _, pages, _, _ in self._deferred)

    def take_deferred_page(self) -> int:
        """A page held back for the step in flight, for the step being scheduled: that step
        takes the in-flight step's pool as input, so the device runs it after and its
        writes land after the old ones. Only the scheduler's own steps may do this; other
        writers (a transfer into pages the decode role reserves) wait for ``step_done``."""
        for i in range(len(self._deferred) - 1, -1, -1):
            if self._deferred[i][1]:
                return self._deferred[i][1].pop()
        raise AssertionError("no deferred page")

    def step_done(self, step_id: int) -> None:
        """The results of step ``step_id`` (and all before it) are read: free what waited."""
        if self.inflight_step == step_id:
            self.inflight_step = None
        keep = []
        for item in self._deferred:
            if item[0] <= step_id:
                self._release_now(*item[1:])
            else:
                keep.append(item)
        self._deferred = keep

    # ---- pages another worker writes (the P/D decode role) ------------------------

    def reserve(self, owner: Hashable, n: int, state: bool = False) -> list[int]:
        """``n`` pages (``can_allocate`` first) for a transfer into this pool, recorded under
        ``owner`` until ``claim`` (a request takes them) or ``unreserve``; with ``state``
        also a state slot (``can_allocate_slot`` first; ``reserved_slot`` says which)."""
        assert owner not in self._reserved and owner not in self._held, f"{owner!r} already holds pages"
        assert not state or self._slots is not None, "a state slot, but the model has no state"
        pages = self.allocate(n)
        self._reserved[owner] = pages
        if state:
            self._reserved_slot[owner] = self.allocate_slot()
        return list(pages)

    def reserved_slot(self, owner: Hashable) -> int:
        """The state slot reserved with ``owner``'s pages (0: none)."""
        return self._reserved_slot.get(owner, 0)

    def claim(self, owner: Hashable) -> tuple[list[int], int]:
        """The transfer into ``owner``'s reservation ended well: its pages (and state slot)
        are a request's now (freed with the request). Returns them ([], 0 if ``owner``
        reserved nothing)."""
        return self._reserved.pop(owner, []), self._reserved_slot.pop(owner, 0)

    def unreserve(self, owner: Hashable, hold_s: float = 0.0) -> None:
        """The transfer into ``owner``'s reservation will not be used. ``hold_s`` > 0: the
        peer may still be writing, so the pages stay out of the allocator until
        ``end_hold(owner)`` or ``hold_s`` seconds pass; 0: nothing can write them, free now
        (or once the step in flight is collected)."""
        pages, slot = self._reserved.pop(owner, []), self._reserved_slot.pop(owner, 0)
        if hold_s > 0 and (pages or slot):
            self._held.hold(owner, (pages, slot), hold_s)
        else:
            self.free(pages, slot=slot)

    def holds(self, owner: Hashable) -> bool:
        return owner in self._reserved or owner in self._reserved_slot or owner in self._held

    def end_hold(self, owner: Hashable) -> bool:
        """The peer confirmed no write into ``owner``'s held pages is in flight: free them.
        False when ``owner`` holds none (it expired, or never failed)."""
        held = self._held.pop(owner)
        if held is not None:
            self.free(held[0], slot=held[1])
        return held is not None

    def expire_holds(self, now: float | None = None) -> int:
        """Free the holds whose deadline passed; returns how many pages."""
        n = 0
        for o in self._held.expired(now):
            pages, slot = self._held.pop(o)
            n += len(pages)
            self.free(pages, slot=slot)
        return n

    # ---- the prefix cache ---------------------------------------------------------

    @property
    def has_cache(self) -> bool:
        return self.cache is not None

    def describe(self, max_lines: int = 40) -> list[str]:
        """The prefix cache's tree as text lines ([] without a cache)."""
        return self.cache.describe(max_lines) if self.cache is not None else []

    def match(self, tokens: Seq[int]) -> tuple[Optional[Node], list[int]]:
        """The cached pages of the longest whole-page prefix of ``tokens``, locked (release
        the lock with ``release``/``free(unlock=...)``). (None, []) without a cache."""
        if self.cache is None:
            return None, []
        m = self.cache.match(tokens)
        self.cache.lock(m.node)
        if self.tiers is None:
            return m.node, list(m.pages)
        return self._match_lower(tokens, m.node, list(m.pages))

    def _match_lower(self, tokens: Seq[int], node: Node, pages: list[int]) -> tuple[Node, list[int]]:
        """Continue a device match into the tiers: the pages found there are loaded into new
        device pages (as many as can be allocated) and enter the tree; the lock moves to the
        node that ends them."""
        S, start = self.page_size, len(pages)
        prev, keys = self.cache.prev_hash(node), []
        for i in range(start, len(tokens) // S):
            prev = page_hash(prev, tokens[i * S:(i + 1) * S])
            keys.append(prev)
        hits = self.tiers.lookup(keys) if keys else []
        n = min(len(hits), self.num_free + self.num_evictable)  # (the matched path is locked)
        if n == 0:
            return node, pages
        dst = self.allocate(n)
        got = self.tiers.load(keys[:n], hits[:n], dst)
        self._alloc.free(dst[got:])  # never written
        if got == 0:
            return node, pages
        res = self.cache.insert(tokens[:(start + got) * S], pages + dst[:got])
        assert not res.duplicates and res.new == got, "the tree changed between match and load"
        self.cache.lock(res.node)
        self.cache.unlock(node)
        return res.node, res.pages

    def unlock_now(self, node: Optional[Node]) -> None:
        """Undo a ``match`` whose pages no step has used (admission gave up)."""
        if node is not None:
            self.cache.unlock(node)

    def commit(self, tokens: Seq[int], pages: list[int], node: Optional[Node]) -> tuple[list[int], Optional[Node]]:
        """Put the whole pages of ``tokens`` (their KV written, or being written by a step
        already launched) into the cache. Returns the request's page list remapped to the
        tree's copies and the node its lock now holds; duplicate pages are freed once no
        step in flight can touch them. Without a cache: (pages, None)."""
        if self.cache is None:
            return pages, node
        res = self.cache.insert(tokens, pages)
        self.cache.lock(res.node)
        self.free(res.duplicates, unlock=[node] if node is not None else [])
        if self.tiers is not None and res.new:  # write-through: the new leaf's pages go down
            copy = self.tiers.backup(res.node.pages, res.node.hashes, chain=self.cache.path_hashes(res.node.parent))
            if copy is not None:
                copy.node = res.node
                self.cache.lock(res.node)  # until poll_copies sees the copy complete
        return res.pages + pages[len(res.pages):], res.node

    def release(self, tokens: Seq[int], pages: list[int], node: Optional[Node], keep: bool = True,
                slot: int = 0) -> None:
        """A request is done with its pages (and state slot). With ``keep`` its committed KV
        (``tokens``, whole pages) enters the cache first; without, the cache keeps only what
        it already held (a failed or aborted request adds nothing). The rest is freed and the
        lock dropped, all deferred while a step is in flight."""
        if self.cache is None:
            return self.free(pages, slot=slot)
        assert not slot, "a prefix cache with recurrent state (validation refuses it)"
        if not pages and node is None:  # released already: a second release does nothing
            return
        if keep:
            pages, node = self.commit(tokens, pages, node)
            n = min(len(tokens) // self.page_size, len(pages))
        else:
            n = len(self.cache.path_pages(node))  # the matched prefix: the tree's pages
        self.free(pages[n:], unlock=[node])

    def flush(self) -> int:
        """Evict every unlocked cached page back to the allocator; returns how many."""
        if self.cache is None:
            return 0
        self.poll_copies(block=True)  # a copy in flight pins its pages
        pages = self.cache.evict(self.cache.num_evictable)
        self._alloc.free(pages)
        return len(pages)

    def check(self, live: Seq[Seq[int]] = (), live_slots: Seq[int] = ()) -> None:
        """Integrity: tree + free + deferred + held + live (the request page lists' pages the
        tree does not hold, and reservations) are the usable pages, each once; the same for
        state slots (free + live + reserved + deferred + held); the tree's own invariants hold."""
        if self._slots is not None:
            slots = [s for s in live_slots if s] + list(self._reserved_slot.values())
            slots += [s for *_, sl in self._deferred for s in sl] + [s for _, s in self._held.items() if s]
            slots += list(self._slots._free)
            assert len(slots) == len(set(slots)), "a state slot in two places"
            assert len(slots) == self._slots.num_usable, (
                f"{self._slots.num_usable} usable state slots, accounted {len(slots)}: free {self._slots.num_free}")
        tree: list[int] = []
        if self.cache is not None:
            self.cache.check()
            tree = self.cache.pages()
        in_tree = set(tree)
        if self.tiers is not None:
            self.tiers.check()
            for c in self.tiers.inflight:
                if c.kind == "d2h":
                    assert c.node.lock > 0 and in_tree.issuperset(c.src), \
                        "a copy in flight reads pages that are not locked in the tree"
        owned = [p for pages in live for p in pages if p not in in_tree]
        owned += [p for pages in self._reserved.values() for p in pages]
        deferred = [p for _, pages, _, _ in self._deferred for p in pages]
        held = [p for pages, _ in self._held.items() for p in pages]
        everything = tree + owned + deferred + held + list(self._alloc._free)
        assert len(everything) == len(set(everything)), "a page in two places"
        assert len(everything) == self.num_usable, (
            f"{self.num_usable} usable pages, accounted {len(everything)}: tree {len(tree)}, "
            f"live {len(owned)}, deferred {len(deferred)}, held {len(held)}, free {self.num_free}")

