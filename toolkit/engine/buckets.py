"""Shape buckets: every array reaching jit is padded to one of a few sizes."""

from __future__ import annotations


def pow2_buckets(lo: int, hi: int) -> list[int]:
    """Powers of two from lo up to the first one >= hi, e.g. (8, 100) -> [8, 16, 32, 64, 128]."""
    out, b = [], max(1, lo)
    while True:
        out.append(b)
        if b >= hi:
            return out
        b *= 2


def bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
