"""Host-side page allocator. Page 0 is the padding page and is never handed out.

It prefers contiguous runs: a transfer of consecutive pages to consecutive pages
merges into one descriptor per (buffer, layer) instead of one per page, which is
what moves KV at copy speed over NIXL (docs/benchmarks.md: 16384 scattered 32 KiB
descriptors ran at ~4 GB/s, the same bytes as 64 runs at ~500 GB/s).
"""

from __future__ import annotations

import bisect


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold ``num_tokens`` tokens (the one ceil-div of pages in the project)."""
    return -(-num_tokens // page_size)


class PageAllocator:
    def __init__(self, num_pages: int):
        assert num_pages >= 2, "need the padding page plus at least one usable page"
        self.num_pages = num_pages
        self._free: list[int] = list(range(1, num_pages))  # sorted
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return len(self._used)

    def all_free(self) -> bool:
        return self.num_free == self.num_usable

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """The first run of n consecutive free pages, else the n lowest free pages."""
        assert self.can_allocate(n), f"asked for {n} pages, {self.num_free} free"
        f, start, run = self._free, 0, 1
        for i in range(1, len(f)):
            if run >= n:
                break
            if f[i] == f[i - 1] + 1:
                run += 1
            else:
                start, run = i, 1
        if run < n:
            start = 0
        pages = f[start:start + n]
        del f[start:start + n]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            assert p in self._used, f"page {p} freed twice or never allocated"
            self._used.remove(p)
            bisect.insort(self._free, p)
