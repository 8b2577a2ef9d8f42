"""The router's guess of what each worker's prefix cache holds, for ``role.policy=cache_aware``.

The router never sees a worker's tree; it remembers what it sent where. Token ids are cut
into blocks of ``block`` tokens, each block keyed by a chained hash (its tokens and the
previous block's key), so a key stands for a whole prefix. A worker's index is the set of
keys of the sequences it served (the prompt, and for decode workers the answer too, which
their cache keeps), bounded with least-recently-used eviction. ``match`` counts how many
leading blocks of a prompt a worker holds. It is approximate by design: a worker's own
eviction, a restart, or a block size other than its page size make it wrong, and a wrong
guess only costs a cache miss, never a wrong answer.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np


def block_keys(tokens: Sequence[int], block: int) -> list[bytes]:
    """Chained keys of the whole blocks of ``tokens``."""
    keys, prev = [], b""
    arr = np.asarray(tokens, np.uint32)
    for i in range(len(tokens) // block):
        prev = hashlib.blake2b(prev + arr[i * block:(i + 1) * block].tobytes(), digest_size=12).digest()
        keys.append(prev)
    return keys


class PrefixIndex:
    """One worker's approximate prefix cache: chained block keys in LRU order."""

    def __init__(self, block: int = 16, capacity: int = 1 << 16):
        self.block, self.capacity = block, capacity
        self._keys: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def insert(self, tokens: Sequence[int]) -> None:
        for k in block_keys(tokens, self.block):
            self._keys[k] = None
            self._keys.move_to_end(k)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def match(self, tokens: Sequence[int]) -> int:
        """Leading tokens of ``tokens`` this worker likely holds (whole blocks)."""
        n = 0
        for k in block_keys(tokens, self.block):
            if k not in self._keys:
                break
            self._keys.move_to_end(k)
            n += 1
        return n * self.block

    def clear(self) -> None:
        """The worker left the rotation: a restarted one starts empty."""
        self._keys.clear()

    def __len__(self) -> int:
        return len(self._keys)


def pick_cache_aware(workers: list, tokens: Sequence[int], margin: int, start: int = 0):
    """The worker most likely to hold the longest prefix of ``tokens`` (``w.index``), unless
    it has more than ``margin`` requests in flight beyond the least loaded one: then the
    least loaded. Ties go to the least loaded; ties among those rotate with ``start`` (a
    counter), so requests that hit nowhere spread. ``workers`` are live, non-empty."""
    rotated = workers[start % len(workers):] + workers[:start % len(workers)]
    least = min(rotated, key=lambda w: w.in_flight)
    best = max(workers, key=lambda w: (w.index.match(tokens), -w.in_flight))
    if best.index.match(tokens) == 0 or best.in_flight > least.in_flight + margin:
        return least
    return best
