"""Host-side page allocator. Page 0 is the padding page and is never handed out."""

from __future__ import annotations

from collections import deque


class PageAllocator:
    def __init__(self, num_pages: int):
        assert num_pages >= 2, "need the padding page plus at least one usable page"
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(1, num_pages))
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
        assert self.can_allocate(n), f"asked for {n} pages, {self.num_free} free"
        pages = [self._free.popleft() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            assert p in self._used, f"page {p} freed twice or never allocated"
            self._used.remove(p)
            self._free.append(p)
