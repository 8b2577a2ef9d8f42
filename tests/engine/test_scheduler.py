"""The scheduler on its own: fake sequences, a real page allocator, no model and no JAX."""

from __future__ import annotations

import subprocess
import sys

from toolkit.cache.manager import CacheManager
from toolkit.config.schema import EngineConfig
from toolkit.engine.request import SamplingParams, Sequence, Status
from toolkit.engine.scheduler import Scheduler


def make(num_pages=64, **kw) -> tuple[Scheduler, CacheManager]:
    cfg = EngineConfig(**{**dict(page_size=4, num_pages=num_pages, chunk_size=16, max_prefill_seqs=4,
                                 max_batch_size=8, interleave_decode=False), **kw})
    alloc = CacheManager(cfg.num_pages, cfg.page_size)
    return Scheduler(cfg, alloc, max_model_len=256), alloc


def seq(n: int, max_new: int = 8) -> Sequence:
    return Sequence(list(range(1, n + 1)), SamplingParams(max_new_tokens=max_new))


def run(batch) -> None:
    """What the engine does with a batch: the fed tokens now have KV; a chunk that reaches
    the end of a sequence's tokens samples one more."""
    for s, n in zip(batch.seqs, batch.num_tokens):
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.output_ids.append(7)


def test_import_needs_no_jax():
    """Guards against the scheduler pulling JAX in again (its batch type lived in the runner),
    which made it impossible to unit-test without a device."""
    code = "import sys, toolkit.engine.scheduler; print(sorted(m for m in sys.modules if m.split('.')[0] == 'jax'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_chunked_prefill_respects_budget_and_allocates_whole_prompts():
    """Guards against a prefill step over engine.chunk_size tokens, or a sequence admitted
    without pages for its whole prompt."""
    sch, alloc = make()
    a, b = seq(10), seq(20)
    sch.add(a), sch.add(b)
    batch = sch.schedule()
    assert not batch.is_decode and batch.seqs == [a, b] and batch.num_tokens == [10, 6]
    assert len(a.pages) == 3 and len(b.pages) == 5 and alloc.num_used == 8
    run(batch)
    batch = sch.schedule()  # b's rest; a waits for decode (no interleave here)
    assert batch.seqs == [b] and batch.num_tokens == [14]
    run(batch)
    batch = sch.schedule()
    assert batch.is_decode and batch.seqs == [a, b] and batch.num_tokens == [1, 1]


def test_decode_preempts_the_newest_when_pages_run_out():
    """Guards against a decode step that needs a page when none is free: the most recently
    admitted sequence gives its pages back and waits (recomputed later); nothing leaks."""
    sch, alloc = make(num_pages=5, chunk_size=16)  # 4 usable pages
    a, b = seq(8), seq(8)  # two pages each: the pool is full after prefill
    sch.add(a), sch.add(b)
    run(sch.schedule())
    assert alloc.num_free == 0
    batch = sch.schedule()  # both need a third page for token 9
    assert batch.is_decode and batch.seqs == [a]
    assert b.status is Status.WAITING and b.num_computed == 0 and not b.pages and b.num_preemptions == 1
    assert sch.num_preemptions == 1 and list(sch.waiting) == [b] and len(a.pages) == 3
    sch.release(a)
    sch.detach(b)
    assert alloc.all_free()


def test_pages_freed_during_a_step_wait_for_it():
    """Guards against handing a page to another request while a launched step may still
    write it: pages freed with a step in flight return when that step is read."""
    sch, alloc = make()
    a = seq(8)
    sch.add(a)
    run(sch.schedule())
    alloc.inflight_step = 3
    sch.release(a)
    assert alloc.num_used == 2, "pages went back while step 3 may still write them"
    sch.step_done(2)
    assert alloc.num_used == 2
    sch.step_done(3)
    assert alloc.all_free() and alloc.inflight_step is None


def test_a_full_batch_admits_nothing_more():
    """Guards against admitting past engine.max_batch_size running sequences."""
    sch, _ = make(max_batch_size=2)
    xs = [seq(4) for _ in range(3)]
    for x in xs:
        sch.add(x)
    batch = sch.schedule()
    assert batch.seqs == xs[:2] and list(sch.waiting) == [xs[2]]
    for x in xs[:2]:
        sch.release(x)
