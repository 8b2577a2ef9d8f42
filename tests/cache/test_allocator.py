"""The page allocator: page 0 reserved, no double frees, contiguous runs preferred."""

import numpy as np
import pytest

from toolkit.cache.allocator import PageAllocator


def test_page_zero_never_handed_out_and_all_free_again():
    """Guards against the padding page being given to a request, or pages lost on free."""
    a = PageAllocator(17)
    got = a.allocate(16)
    assert 0 not in got and sorted(got) == list(range(1, 17))
    assert not a.can_allocate(1)
    a.free(got)
    assert a.all_free()


def test_double_free_is_caught():
    """Guards against a page freed twice ending up owned by two requests later."""
    a = PageAllocator(8)
    p = a.allocate(2)
    a.free(p)
    with pytest.raises(AssertionError, match="freed twice"):
        a.free(p[:1])


def test_prefers_contiguous_runs_after_fragmentation():
    """Guards against scattered pages when a contiguous run exists (each scattered page is a
    separate transfer descriptor per layer)."""
    a = PageAllocator(64)
    blocks = [a.allocate(4) for _ in range(10)]
    for b in blocks[::2]:  # free every other block: holes of 4
        a.free(b)
    run = a.allocate(6)  # no hole of 6 among the first pages: takes the tail run
    assert run == list(range(run[0], run[0] + 6))
    small = a.allocate(4)  # fits the first hole exactly
    assert small == blocks[0]
    rng = np.random.default_rng(0)
    held = [run, small] + blocks[1::2]
    for _ in range(200):  # random churn keeps the invariants
        if held and rng.random() < 0.5:
            a.free(held.pop(rng.integers(len(held))))
        elif a.can_allocate(3):
            held.append(a.allocate(3))
    assert a.num_used + a.num_free == a.num_usable
    for h in held:
        a.free(h)
    assert a.all_free()
