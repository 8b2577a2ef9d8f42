"""The bucket set (toolkit/engine/buckets.py) on its own: pure Python, no JAX, no compiles.

Warm-up compiles ``BucketSet.shapes()`` and nothing else, so every step the scheduler can
hand the runner must pad to one of those shapes; these tests check that for the shapes the
scheduler really produces (driven here without a model) and for random batches within the
config's limits.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import subprocess
import sys
import zlib

import pytest

from toolkit.cache.allocator import pages_for
from toolkit.cache.manager import CacheManager
from toolkit.config.schema import EngineConfig
from toolkit.engine.buckets import BucketSet, StepShape, bucket, pow2_buckets
from toolkit.engine.request import SamplingParams, Sequence, Status
from toolkit.engine.scheduler import Scheduler


def cfg(**kw) -> EngineConfig:
    base = dict(page_size=4, num_pages=64, max_batch_size=8, chunk_size=16, max_prefill_seqs=2,
                max_model_len=64, min_bucket=8, shape_buckets="compact", attention_backend="reference")
    base.update(kw)
    return EngineConfig(**base)


def bucket_set(ecfg: EngineConfig, decode_family: bool = True) -> BucketSet:
    """What ModelRunner builds: widths from the pages of max_model_len."""
    return BucketSet.from_config(ecfg, pages_for(ecfg.max_model_len, ecfg.page_size), kernels=False,
                                 decode_family=decode_family)


def shape_of(bs: BucketSet, ecfg: EngineConfig, seqs_kv: list[tuple[int, int]], is_decode: bool,
             sample: bool) -> StepShape:
    """The shape ModelRunner._prepare picks: seqs_kv is (num_computed, tokens fed) per sequence."""
    pages = max(pages_for(start + k, ecfg.page_size) for start, k in seqs_kv)
    if is_decode:
        return bs.decode_shape(len(seqs_kv), pages, sample)
    return bs.prefill_shape(sum(k for _, k in seqs_kv), len(seqs_kv), pages)


def expected_len(bs: BucketSet) -> int:
    """The documented count: decode (batch buckets x widths, greedy and sampling) + prefill
    (token buckets x sequence counts x widths, leaving out B > T when there are several
    counts; the sampling variant only)."""
    dec = len(bs.batch) * len(bs.widths) if bs.decode_family else 0
    pairs = [(t, b) for t, b in itertools.product(bs.tokens, bs.prefill_seqs)
             if b <= t or len(bs.prefill_seqs) == 1]
    return 2 * dec + len(pairs) * len(bs.widths)


# Configs the property tests sweep: the test config, chunk and batch sizes that are not powers
# of two, min_bucket above chunk_size / max_batch_size, more prefill sequences than tokens.
CONFIGS = [
    dict(),
    dict(min_bucket=4),
    dict(min_bucket=1, max_batch_size=5, chunk_size=12, max_prefill_seqs=3, max_model_len=50),
    dict(min_bucket=16, max_batch_size=4, chunk_size=8, max_prefill_seqs=4),
    dict(min_bucket=1, chunk_size=4, max_prefill_seqs=8, page_size=1, max_model_len=33),
    dict(min_bucket=2, max_batch_size=32, chunk_size=64, max_prefill_seqs=8, page_size=16, max_model_len=256),
    dict(min_bucket=8, max_batch_size=3, chunk_size=100, max_prefill_seqs=1, page_size=8, max_model_len=100),
]
CASES = [(layout, c) for layout in ("compact", "fine") for c in CONFIGS]


def _id(case):
    layout, c = case
    return layout + "-" + ("-".join(f"{k}={v}" for k, v in c.items()) or "base")


def test_buckets_import_no_jax():
    """Guards against the bucket module pulling JAX in: validation and the scheduler's
    tests read it without a device."""
    code = "import sys, toolkit.engine.buckets; print(sorted(m for m in sys.modules if m.split('.')[0] == 'jax'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_pow2_buckets_and_bucket():
    """Guards against off-by-one bucket edges: the last bucket must cover hi, a value equal to
    a bucket maps to it, and a value past the last one is refused instead of truncated."""
    assert pow2_buckets(8, 100) == [8, 16, 32, 64, 128]
    assert pow2_buckets(8, 64) == [8, 16, 32, 64]
    assert pow2_buckets(8, 3) == [8]
    assert pow2_buckets(1, 1) == [1]
    assert pow2_buckets(0, 4) == [1, 2, 4]
    assert [bucket(n, [8, 16, 32]) for n in (1, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
        bucket(33, [8, 16, 32])


def test_from_config_compact():
    """Guards against the compact layout growing extra widths or prefill sequence counts (each
    one multiplies the shapes a GPU worker compiles at start-up)."""
    ecfg = cfg()
    bs = bucket_set(ecfg)
    assert (bs.layout, bs.batch, bs.tokens, bs.prefill_seqs, bs.widths) == ("compact", (8,), (8, 16), (2,), (16,))
    assert bs.decode_family
    assert len(bs) == 4 == expected_len(bs)
    assert [str(s) for s in bs.shapes()] == [
        "decode T=8 B=8 W=16 greedy", "decode T=8 B=8 W=16 sample",
        "prefill T=8 B=2 W=16 sample", "prefill T=16 B=2 W=16 sample"]
    assert bs.describe().startswith("4 step shapes (compact): ")
    bigger = bucket_set(cfg(min_bucket=4, max_batch_size=16, chunk_size=32, max_prefill_seqs=4))
    assert (bigger.batch, bigger.tokens, bigger.prefill_seqs, bigger.widths) == ((4, 8, 16), (4, 8, 16, 32), (4,), (16,))
    assert len(bigger) == 2 * 3 + 4 == expected_len(bigger)


def test_from_config_fine():
    """Guards against the fine layout missing a page-table width or prefill sequence count (a
    compile while serving) or counting impossible prefill shapes (B > T)."""
    ecfg = cfg(shape_buckets="fine", min_bucket=2, max_prefill_seqs=8)
    bs = bucket_set(ecfg)
    assert (bs.layout, bs.batch, bs.tokens, bs.prefill_seqs, bs.widths) == (
        "fine", (2, 4, 8), (2, 4, 8, 16), (1, 2, 4, 8), (1, 2, 4, 8, 16))
    # prefill (T, B) pairs with B <= T: T=2: 2, T=4: 3, T=8: 4, T=16: 4 -> 13
    assert len(bs) == 2 * 3 * 5 + 13 * 5 == 95 == expected_len(bs)
    assert all(s.B <= s.T for s in bs.shapes() if not s.decode)
    # widths cover max_model_len's pages when it is not a power of two
    assert bucket_set(cfg(shape_buckets="fine", max_model_len=50)).widths == (1, 2, 4, 8, 16)


def test_auto_resolves_by_backend():
    """Guards against ``auto`` picking the fine layout for the Pallas kernels (hundreds of GPU
    compiles) or compact for the jnp reference (CPU attention over the padded table)."""
    ecfg = cfg(shape_buckets="auto")
    assert BucketSet.from_config(ecfg, 16, kernels=True).layout == "compact"
    assert BucketSet.from_config(ecfg, 16, kernels=False).layout == "fine"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_len_is_documented_product_and_shapes_unique(case):
    """Guards against ``len(bucket_set)`` (what /metrics reports as step_shapes and what
    warm-up promises to compile) disagreeing with the shapes warm-up runs, and against
    duplicate shapes (compiled twice in the progress count)."""
    layout, c = case
    for decode_family in (True, False):
        bs = bucket_set(cfg(shape_buckets=layout, **c), decode_family=decode_family)
        shapes = bs.shapes()
        assert len(bs) == len(shapes) == len(set(shapes)) == expected_len(bs)
        # decode: greedy and sampling twins; prefill: sampling only
        dec = [s for s in shapes if s.decode]
        assert sum(s.sample for s in dec) == len(dec) // 2 and all(s.sample for s in shapes if not s.decode)
        for s in shapes:
            assert s.max_q_len == (1 if s.decode else max(2, s.T))
            if s.decode:
                assert s.T == s.B


@pytest.mark.parametrize("layout", ["compact", "fine"])
def test_prefill_only_set_has_no_decode_shapes(layout):
    """Guards against a prefill-only worker (role=prefill, which never decodes) compiling
    the decode family at start-up."""
    ecfg = cfg(shape_buckets=layout, min_bucket=4)
    full, pre = bucket_set(ecfg), bucket_set(ecfg, decode_family=False)
    assert not pre.decode_family and not any(s.decode for s in pre.shapes())
    assert set(pre.shapes()) == {s for s in full.shapes() if not s.decode}
    assert len(pre) == len(full) - 2 * len(full.batch) * len(full.widths)
    assert "decode" not in pre.describe()


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_random_batches_within_limits_land_in_the_set(case):
    """Guards against a batch the scheduler may build (any decode batch size up to
    max_batch_size at any context length up to max_model_len; any prefill of up to
    max_prefill_seqs sequences and chunk_size tokens) padding to a shape outside the set:
    it would compile while serving, after warm-up."""
    layout, c = case
    ecfg = cfg(shape_buckets=layout, **c)
    bs = bucket_set(ecfg)
    shapes = set(bs.shapes())
    rng = random.Random(zlib.crc32(_id(case).encode()))
    L = ecfg.max_model_len
    for _ in range(1500):
        sample = rng.random() < 0.5
        # decode: one token per sequence at kv position start (start + 1 <= max_model_len)
        n = rng.randint(1, ecfg.max_batch_size)
        dec = [(rng.randint(0, L - 1), 1) for _ in range(n)]
        if rng.random() < 0.2:
            dec[0] = (L - 1, 1)  # one sequence at the full context
        sh = shape_of(bs, ecfg, dec, True, sample)
        assert sh in shapes, (sh, dec)
        assert sh.B >= n and sh.W * ecfg.page_size >= max(s + k for s, k in dec)
        # prefill: n sequences, >= 1 token each, chunk_size in all, kv_end <= max_model_len
        n = rng.randint(1, min(ecfg.max_prefill_seqs, ecfg.chunk_size))
        budget = rng.randint(n, ecfg.chunk_size)
        cuts = sorted(rng.sample(range(1, budget), n - 1)) if n > 1 else []
        ks = [b - a for a, b in zip([0, *cuts], [*cuts, budget])]
        pre = []
        for k in ks:
            k = min(k, L)  # a chunk never holds more than a context
            pre.append((rng.randint(0, L - k), k))
        sh = shape_of(bs, ecfg, pre, False, sample)
        assert sh in shapes, (sh, pre)
        assert sh.T >= sum(k for _, k in pre) and sh.B >= len(pre)


def _drive_scheduler(ecfg: EngineConfig, rng: random.Random, bs: BucketSet, num_requests: int) -> tuple[int, int]:
    """Run the real scheduler without a model (as the engine does, without overlap): random
    prompts and lengths arriving over time, a pool small enough to preempt. Checks every
    batch's shape is in the set; returns (steps, preemptions)."""
    alloc = CacheManager(ecfg.num_pages, ecfg.page_size)
    L = ecfg.max_model_len
    sch = Scheduler(ecfg, alloc, L)
    shapes = set(bs.shapes())
    pending, steps = [], 0
    for _ in range(num_requests):
        n = rng.choice([1, 2, rng.randint(1, L - 1), rng.randint(1, L - 1), L - 1])
        max_new = rng.randint(1, L - n)
        assert pages_for(n + max_new, ecfg.page_size) <= alloc.num_usable  # Engine.check_fits
        temp = rng.choice([0.0, 0.0, 0.8])
        pending.append(Sequence([5] * n, SamplingParams(max_new_tokens=max_new, temperature=temp, ignore_eos=True)))
    while pending or sch.has_work():
        for _ in range(rng.randint(0, 3)):
            if pending:
                sch.add(pending.pop(0))
        batch = sch.schedule()
        if batch is None:
            continue
        steps += 1
        assert len(batch.seqs) <= (ecfg.max_batch_size if batch.is_decode else ecfg.max_prefill_seqs)
        assert batch.is_decode or sum(batch.num_tokens) <= ecfg.chunk_size
        sample = any(s.params.temperature > 0 for s in batch.seqs)
        kv = [(s.num_computed, k) for s, k in zip(batch.seqs, batch.num_tokens)]
        assert max(a + k for a, k in kv) <= L
        sh = shape_of(bs, ecfg, kv, batch.is_decode, sample)
        assert sh in shapes, (sh, kv, batch.is_decode)
        for s, k in zip(batch.seqs, batch.num_tokens):  # what the engine does with the results
            s.num_computed += k
            if s.num_computed == s.num_tokens:
                s.output_ids.append(7)
                if s.at_length_limit(L):
                    sch.release(s)
                    s.status = Status.FINISHED
        assert steps < 100_000
    assert alloc.all_free()
    return steps, sch.num_preemptions


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_scheduler_batches_land_in_the_set(case):
    """Guards against the scheduler and the bucket set disagreeing about the limits (e.g. a
    prefill of more sequences or tokens than the set's largest bucket, a recomputed
    preempted request wider than the page-table widths): every batch the real scheduler
    builds, including under preemption, pads to a shape of the set."""
    layout, c = case
    base = cfg(shape_buckets=layout, **c)
    rng = random.Random(zlib.crc32(_id(case).encode()))
    preemptions = 0
    for interleave, pages in ((True, 0), (False, 0), (True, 1)):
        # pages=1: just enough pages for the longest request, so decode has to preempt
        num_pages = 1 + pages_for(base.max_model_len, base.page_size) + pages if pages else 256
        ecfg = dataclasses.replace(base, interleave_decode=interleave, num_pages=max(num_pages, 2))
        _, p = _drive_scheduler(ecfg, rng, bucket_set(ecfg), num_requests=40)
        preemptions += p
    assert preemptions > 0, "the small pool never preempted: the test lost its point"


@pytest.mark.parametrize("override,option", [
    (dict(min_bucket=3), "engine.min_bucket"),
    (dict(min_bucket=0), "engine.min_bucket"),
    (dict(shape_buckets="bogus"), "engine.shape_buckets"),
])
def test_validation_refuses_bad_bucket_options(override, option):
    """Guards against a min_bucket that is not a power of two (buckets of 3, 6, 12: shapes
    the kernels' power-of-two paths do not expect) or an unknown layout reaching the engine,
    instead of a ConfigError naming the option."""
    from toolkit.config.validate import ConfigError, validate_engine

    with pytest.raises(ConfigError, match=option.replace(".", r"\.")) as e:
        validate_engine(cfg(**override))
    assert str(override[next(iter(override))]) in str(e.value)
    if "shape_buckets" in override:  # names what is allowed
        assert all(x in str(e.value) for x in ("auto", "compact", "fine"))
    # and the bucket set itself refuses an unknown layout
    if "shape_buckets" in override:
        with pytest.raises(ValueError, match="engine.shape_buckets"):
            bucket_set(cfg(**override))
