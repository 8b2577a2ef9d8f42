"""Shape buckets: every array reaching jit is padded to one of a few sizes, and the set of
step shapes is a function of the config alone (``BucketSet.from_config``), known before
the first request, so a worker compiles all of them at start-up (``Engine.warmup``) and
never again while serving.

A step's executable is keyed by (family, T tokens, B sequences, W page-table width,
sampling on or off); ``max_q_len`` (the prefill kernels' static query bound) is T itself
(at least 2: 1 selects the decode kernels). Decode has a greedy and a sampling variant (a
greedy batch skips sorting B x vocab logits every step). Prefill has the sampling variant
only: greedy rows take the argmax inside it, and one sort per prefill step is noise beside
the prefill itself, while a second variant per token bucket would add a third of the
shapes a GPU worker compiles at start-up.

Two layouts (``engine.shape_buckets``):

- ``compact``: one page-table width (the pages of ``max_model_len``) and, for prefill, one
  sequence count (``max_prefill_seqs``). The GPU kernels loop to each sequence's
  ``kv_len`` and skip sequences with no queries, so the padding costs a larger host
  array, not device work. Decode: one shape per batch bucket; prefill: one per token bucket.
- ``fine``: widths and prefill sequence counts in powers of two too. The jnp reference
  attention gathers the whole padded table and attends over it (cost grows with B x T x W),
  so on CPU the padding would cost real time; the price is more shapes.
- ``auto``: compact when the attention backend resolves to the Pallas kernels, else fine.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Sequence

SHAPE_BUCKETS = ("auto", "compact", "fine")  # engine.shape_buckets


def pow2_buckets(lo: int, hi: int) -> list[int]:
    """Powers of two from lo up to the first one >= hi, e.g. (8, 100) -> [8, 16, 32, 64, 128]."""
    out, b = [], max(1, lo)
    while True:
        out.append(b)
        if b >= hi:
            return out
        b *= 2


def bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class StepShape:
    """One executable of the jitted step. Decode: T == B, one token per sequence."""

    decode: bool
    T: int  # tokens (padded)
    B: int  # sequences: rows of the page table (padded)
    W: int  # page-table width in pages
    sample: bool  # the sampling path is compiled in (some request has temperature > 0)

    @property
    def max_q_len(self) -> int:
        return 1 if self.decode else max(2, self.T)

    def __str__(self) -> str:
        kind = "decode" if self.decode else "prefill"
        return f"{kind} T={self.T} B={self.B} W={self.W} {'sample' if self.sample else 'greedy'}"


@dataclasses.dataclass(frozen=True)
class BucketSet:
    """The step shapes a worker can run: decode (batch buckets x widths, with and without
    sampling) and prefill (token buckets x sequence counts x widths)."""

    layout: str  # compact | fine (auto resolved)
    batch: tuple[int, ...]  # decode batch sizes
    tokens: tuple[int, ...]  # prefill token counts
    prefill_seqs: tuple[int, ...]  # prefill sequence counts
    widths: tuple[int, ...]  # page-table widths
    decode_family: bool = True  # False for a prefill-only worker (it never decodes)

    @classmethod
    def from_config(cls, ecfg, max_pages: int, kernels: bool, decode_family: bool = True) -> "BucketSet":
        """ecfg: EngineConfig; max_pages: pages of max_model_len; kernels: the attention
        backend is the Pallas one (resolves ``auto``)."""
        layout = ecfg.shape_buckets
        if layout == "auto":
            layout = "compact" if kernels else "fine"
        if layout not in SHAPE_BUCKETS:
            raise ValueError(f"engine.shape_buckets={layout!r}; allowed: {', '.join(SHAPE_BUCKETS)}")
        compact = layout == "compact"
        return cls(
            layout=layout,
            batch=tuple(pow2_buckets(ecfg.min_bucket, ecfg.max_batch_size)),
            tokens=tuple(pow2_buckets(ecfg.min_bucket, ecfg.chunk_size)),
            prefill_seqs=(ecfg.max_prefill_seqs,) if compact else tuple(pow2_buckets(1, ecfg.max_prefill_seqs)),
            widths=(max_pages,) if compact else tuple(pow2_buckets(1, max_pages)),
            decode_family=decode_family)

    # ---- one step's shape ------------------------------------------------------------

    def decode_shape(self, num_seqs: int, max_pages: int, sample: bool) -> StepShape:
        B = bucket(num_seqs, self.batch)
        return StepShape(True, B, B, bucket(max_pages, self.widths), sample)

    def prefill_shape(self, num_tokens: int, num_seqs: int, max_pages: int) -> StepShape:
        """Always the sampling variant (greedy rows take the argmax in it; module docstring)."""
        return StepShape(False, bucket(num_tokens, self.tokens), bucket(num_seqs, self.prefill_seqs),
                         bucket(max_pages, self.widths), True)

    # ---- the whole set ---------------------------------------------------------------

    def shapes(self) -> list[StepShape]:
        """Every shape, decode first (a copy of the list built once)."""
        return list(self._shapes)

    @functools.cached_property
    def _shapes(self) -> tuple[StepShape, ...]:
        """Every shape, decode first. A prefill step of B sequences has at least B tokens,
        so (T, B) with B > T never occurs (fine layout) unless B is the one count (compact)."""
        out = []
        if self.decode_family:
            out += [StepShape(True, b, b, w, smp)
                    for smp in (False, True) for b, w in itertools.product(self.batch, self.widths)]
        out += [StepShape(False, t, b, w, True)
                for t, b, w in itertools.product(self.tokens, self.prefill_seqs, self.widths)
                if b <= t or len(self.prefill_seqs) == 1]
        return tuple(out)

    def __len__(self) -> int:
        return len(self._shapes)

    def describe(self) -> str:
        """One line for the start-up log."""
        fam = []
        if self.decode_family:
            fam.append(f"decode B in {_span(self.batch)} x W in {_span(self.widths)}, greedy and sampling")
        fam.append(f"prefill T in {_span(self.tokens)} x B in {_span(self.prefill_seqs)} x W in {_span(self.widths)}")
        return f"{len(self)} step shapes ({self.layout}): " + "; ".join(fam)


def _span(xs: tuple[int, ...]) -> str:
    return "{" + ",".join(map(str, xs)) + "}"
