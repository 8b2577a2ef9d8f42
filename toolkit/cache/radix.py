"""Prefix caches: the contract (``PrefixCache``) and the page-granular radix tree.

A prefix cache maps token prefixes, in whole pages, to the KV pages that hold them, so a
request whose prompt starts with a cached prefix computes only what follows. It owns the
pages it holds; whoever owns the pool (the cache manager) gives it pages with ``insert``
and takes them back from ``evict``. The cache never talks to the allocator itself.

Protocol of one request (the manager drives it):

    m = cache.match(tokens)          # the longest cached prefix, in whole pages
    cache.lock(m.node)               # always, even when m is empty: unlock must balance
    ... compute past m.num_tokens into new pages ...
    r = cache.insert(committed, m.pages + new_pages)   # the tree takes what it lacks
    free(r.duplicates)               # the request's copies of pages the tree already had
    cache.lock(r.node); cache.unlock(m.node)           # the request now holds r.node
    ... at finish: insert again, lock/unlock the same way, unlock the last node ...
    freed = cache.evict(n)           # when allocation falls short: unlocked LRU leaves

Invariants (``check``): every page is in at most one node; ``num_evictable + num_locked
== num_pages``; a node's lock count is at least the sum of its children's (locking walks
to the root); a node's key is whole pages; each page's chained hash is that of its tokens
and its parent's hash.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import heapq
import itertools
from typing import Optional, Sequence

import numpy as np


def page_hash(prev: bytes, tokens: Sequence[int]) -> bytes:
    """The chained hash of one page: its tokens and the previous page's hash (the seed for
    the first page), so equal hashes mean equal prefixes, not only equal pages."""
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(np.asarray(tokens, np.uint32).tobytes())
    return h.digest()


def hash_seed(*parts: object) -> bytes:
    """The first page's ``prev``: what makes KV of equal tokens differ (model, dtype, page
    size, pool layout), so pages of two models never share a key."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


@dataclasses.dataclass(eq=False)
class Node:
    parent: Optional["Node"]
    key: tuple[int, ...]  # tokens of this node's pages, len == len(pages) * page_size
    pages: list[int]
    hashes: list[bytes]  # one chained hash per page
    children: dict[tuple[int, ...], "Node"] = dataclasses.field(default_factory=dict)  # by first page
    lock: int = 0  # requests holding this node or a descendant
    last_use: int = 0  # logical clock of the last match or insert through it


@dataclasses.dataclass(frozen=True)
class Match:
    node: Node  # lock this (the root for an empty match)
    pages: list[int]  # the cached prefix's pages, in order

    @property
    def num_pages(self) -> int:
        return len(self.pages)


@dataclasses.dataclass(frozen=True)
class Insert:
    node: Node  # the node ending the inserted prefix
    pages: list[int]  # the tree's pages for the whole inserted prefix (remap the request's to these)
    duplicates: list[int]  # the caller's pages the tree already had copies of: the caller frees them
    new: int = 0  # pages the tree took from the caller: ``node`` is then a new leaf holding exactly them


class PrefixCache(abc.ABC):
    """What the cache manager needs of a prefix cache (``cache.policy`` names one)."""

    page_size: int

    @abc.abstractmethod
    def match(self, tokens: Sequence[int]) -> Match:
        """The longest prefix of ``tokens`` held in whole pages (a partial last page never
        matches). Touches it for LRU; changes no lock."""

    @abc.abstractmethod
    def lock(self, node: Node) -> None:
        """Pin ``node`` and its ancestors: their pages cannot be evicted until ``unlock``."""

    @abc.abstractmethod
    def unlock(self, node: Node) -> None:
        """Undo one ``lock(node)``. Unlocking more than was locked is an error."""

    @abc.abstractmethod
    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> Insert:
        """Hand the pages of ``tokens`` (floored to whole pages; ``pages[i]`` holds page i)
        to the cache. It keeps those it lacks and returns the caller's duplicates, which
        the caller frees. Only committed KV may be inserted (written, not in flight)."""

    @abc.abstractmethod
    def evict(self, num_pages: int) -> list[int]:
        """Drop unlocked pages, least recently used leaves first, until at least
        ``num_pages`` are dropped or none is left unlocked; returns them (the caller frees)."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise AssertionError if an invariant (module docstring) does not hold."""

    @property
    @abc.abstractmethod
    def num_pages(self) -> int:
        """Pages the cache holds."""

    @property
    @abc.abstractmethod
    def num_evictable(self) -> int:
        """Pages no request holds: what ``evict`` can return."""

    @property
    def num_locked(self) -> int:
        return self.num_pages - self.num_evictable


class RadixCache(PrefixCache):
    """A radix tree over whole pages: edges are runs of pages, children are keyed by their
    first page's tokens, nodes split only at page boundaries."""

    def __init__(self, page_size: int, seed: bytes = b""):
        self.page_size = page_size
        self.seed = seed
        self.root = Node(None, (), [], [], lock=1)  # never evicted, never unlocked to 0
        self._num_pages = 0
        self._num_evictable = 0
        self._clock = itertools.count(1)

    # ---- walking -------------------------------------------------------------------

    def _page(self, tokens: Sequence[int], i: int) -> tuple[int, ...]:
        S = self.page_size
        return tuple(tokens[i * S:(i + 1) * S])

    def _common_pages(self, node: Node, tokens: Sequence[int], at: int) -> int:
        """Whole pages of ``node.key`` equal to ``tokens`` from page ``at``."""
        S, n = self.page_size, 0
        while n < len(node.pages) and (at + n + 1) * S <= len(tokens) and \
                node.key[n * S:(n + 1) * S] == self._page(tokens, at + n):
            n += 1
        return n

    def _split(self, node: Node, n: int) -> Node:
        """Cut ``node`` after its first ``n`` pages; returns the new upper part."""
        S = self.page_size
        upper = Node(node.parent, node.key[:n * S], node.pages[:n], node.hashes[:n],
                     lock=node.lock, last_use=node.last_use)
        node.parent.children[upper.key[:S]] = upper
        node.key, node.pages, node.hashes = node.key[n * S:], node.pages[n:], node.hashes[n:]
        node.parent = upper
        upper.children[node.key[:S]] = node
        return upper

    def _walk(self, tokens: Sequence[int]) -> tuple[Node, int]:
        """The deepest node whose path is a page-prefix of ``tokens`` (splitting the last
        edge at the page where they part), and the pages matched."""
        node, at, now = self.root, 0, next(self._clock)
        node.last_use = now
        while (at + 1) * self.page_size <= len(tokens):
            child = node.children.get(self._page(tokens, at))
            if child is None:
                break
            n = self._common_pages(child, tokens, at)
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_use = now
            node, at = child, at + n
        return node, at

    @staticmethod
    def _path(node: Node, field: str) -> list:
        """``node.<field>`` (pages or hashes) of every node from the root down to ``node``, joined."""
        parts = []
        while node.parent is not None:
            parts.append(getattr(node, field))
            node = node.parent
        return [x for part in reversed(parts) for x in part]

    @classmethod
    def path_pages(cls, node: Node) -> list[int]:
        """The pages from the root down to ``node`` (what a match ending there returned)."""
        return cls._path(node, "pages")

    @classmethod
    def path_hashes(cls, node: Node) -> list[bytes]:
        """The chained hashes of the pages from the root down to ``node``."""
        return cls._path(node, "hashes")

    # ---- the contract --------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> Match:
        node, _ = self._walk(tokens)
        return Match(node, self.path_pages(node))

    def lock(self, node: Node) -> None:
        while node is not None:
            if node.lock == 0:
                self._num_evictable -= len(node.pages)
            node.lock += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            assert node.lock > (1 if node is self.root else 0), "unlock without a matching lock"
            node.lock -= 1
            if node.lock == 0:
                self._num_evictable += len(node.pages)
            node = node.parent

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> Insert:
        S = self.page_size
        n = min(len(tokens) // S, len(pages))
        node, at = self._walk(tokens[:n * S])
        have = self.path_pages(node)  # the tree's pages for the first `at` pages
        dups = [p for p, q in zip(pages[:at], have) if p != q]
        if at < n:  # a new leaf for the rest
            prev = self.prev_hash(node)
            hashes = []
            for i in range(at, n):
                prev = page_hash(prev, self._page(tokens, i))
                hashes.append(prev)
            leaf = Node(node, tuple(tokens[at * S:n * S]), list(pages[at:n]), hashes, last_use=node.last_use)
            node.children[leaf.key[:S]] = leaf
            self._num_pages += n - at
            self._num_evictable += n - at  # unlocked until someone locks it
            node = leaf
        return Insert(node, have + list(pages[at:n]), dups, new=n - at)

    def prev_hash(self, node: Node) -> bytes:
        """The chained hash of the page ending ``node``'s path (the seed at the root): what
        the next page's hash continues."""
        while node is not None and not node.hashes:
            node = node.parent
        return node.hashes[-1] if node is not None else self.seed

    def evict(self, num_pages: int) -> list[int]:
        heap = [(leaf.last_use, id(leaf), leaf) for leaf in self._leaves() if leaf.lock == 0]
        heapq.heapify(heap)
        out: list[int] = []
        while heap and len(out) < num_pages:
            _, _, leaf = heapq.heappop(heap)
            out += leaf.pages
            parent = leaf.parent
            del parent.children[leaf.key[:self.page_size]]
            self._num_pages -= len(leaf.pages)
            self._num_evictable -= len(leaf.pages)
            if parent is not self.root and not parent.children and parent.lock == 0:
                heapq.heappush(heap, (parent.last_use, id(parent), parent))
        return out

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _leaves(self):
        return (n for n in self._nodes() if not n.children and n is not self.root)

    def describe(self, max_lines: int = 40) -> list[str]:
        """The tree as indented lines: pages, tokens and lock count of each node (for notebooks)."""
        lines: list[str] = []

        def walk(node: Node, depth: int) -> None:
            if len(lines) >= max_lines:
                return
            if node is not self.root:
                lines.append(f"{'  ' * depth}{len(node.pages)} pages ({len(node.key)} tokens) "
                             f"pages {node.pages[0]}..{node.pages[-1]} lock {node.lock}")
            for child in sorted(node.children.values(), key=lambda c: c.pages[0]):
                walk(child, depth + (node is not self.root))

        walk(self.root, 0)
        return lines

    def pages(self) -> list[int]:
        """Every page the tree holds (for the manager's accounting)."""
        return [p for n in self._nodes() for p in n.pages]

    def check(self) -> None:
        S, seen, evictable = self.page_size, set(), 0
        for node in self._nodes():
            assert len(node.key) == len(node.pages) * S == len(node.hashes) * S, "a node of partial pages"
            assert seen.isdisjoint(node.pages), "a page in two nodes"
            seen.update(node.pages)
            assert node.lock >= sum(c.lock for c in node.children.values()), "a child locked past its parent"
            if node.lock == 0:
                evictable += len(node.pages)
            if node is not self.root:
                assert node.pages, "an empty node below the root"
                assert node.parent.children.get(node.key[:S]) is node, "a child under the wrong key"
                prev = self.prev_hash(node.parent)
                for i, h in enumerate(node.hashes):
                    prev = page_hash(prev, node.key[i * S:(i + 1) * S])
                    assert h == prev, "a page hash that is not its prefix's"
        assert self.root.lock >= 1
        assert len(seen) == self._num_pages, (len(seen), self._num_pages)
        assert evictable == self._num_evictable, (evictable, self._num_evictable)

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_evictable(self) -> int:
        return self._num_evictable
