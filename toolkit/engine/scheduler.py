"""Continuous batching with chunked prefill.

Each step is either a prefill step (chunks of prompts, at most chunk_size
tokens, at most max_prefill_seqs sequences) or a decode step (one token for
every running sequence whose prompt is done). New requests are admitted into
the running set between steps, so they join a running decode batch.

With overlapped scheduling the next step is scheduled while the previous one
runs: a sequence whose sampled token is still on the device decodes it next
(the runner feeds it from the device), unless that token surely ends it (length
limits); and pages freed while a step is in flight go back to the allocator only
once that step's results have been read (its KV writes have landed), so no page
is handed out while a write into it may still be pending.
"""

from __future__ import annotations

from collections import deque

from toolkit.cache.allocator import PageAllocator, pages_for
from toolkit.config.schema import EngineConfig
from toolkit.engine.request import Sequence, Status
from toolkit.engine.batch import ScheduledBatch


class Scheduler:
    def __init__(self, ecfg: EngineConfig, allocator: PageAllocator, max_model_len: int):
        self.cfg = ecfg
        self.allocator = allocator
        self.max_model_len = max_model_len
        self.inflight_step: int | None = None  # newest launched step whose results are unread
        self._deferred: list[tuple[int, list[int]]] = []  # (step it waits for, pages)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._last_was_prefill = False
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        decode = [s for s in self.running if s.num_pending == 1 and not self._surely_done(s)]
        partial = [s for s in self.running if s.num_pending > 1]
        yield_to_decode = self.cfg.interleave_decode and self._last_was_prefill and decode
        if (partial or self.waiting) and not yield_to_decode:
            batch = self._schedule_prefill(partial)
            if batch is not None:
                self._last_was_prefill = True
                return batch
        self._last_was_prefill = False
        return self._schedule_decode(decode) if decode else None

    def _surely_done(self, s: Sequence) -> bool:
        """Its in-flight token reaches a length limit: nothing more to compute for it."""
        return s.num_inflight > 0 and s.at_length_limit(self.max_model_len, s.num_inflight)

    def _schedule_prefill(self, partial: list[Sequence]) -> ScheduledBatch | None:
        budget, seqs, counts = self.cfg.chunk_size, [], []
        for s in partial:
            if budget == 0 or len(seqs) == self.cfg.max_prefill_seqs:
                break
            seqs.append(s), counts.append(min(s.num_pending, budget))
            budget -= counts[-1]
        while (self.waiting and budget > 0 and len(seqs) < self.cfg.max_prefill_seqs
               and len(self.running) < self.cfg.max_batch_size):
            s = self.waiting[0]
            if s.num_inflight:  # preempted with a token in flight: recompute once it has arrived
                break
            need = pages_for(s.num_tokens, self.cfg.page_size)
            if not self.allocator.can_allocate(need):
                break
            self.waiting.popleft()
            s.pages, s.status = self.allocator.allocate(need), Status.RUNNING
            self.running.append(s)
            seqs.append(s), counts.append(min(s.num_pending, budget))
            budget -= counts[-1]
        return ScheduledBatch(seqs, counts, is_decode=False) if seqs else None

    def _schedule_decode(self, cands: list[Sequence]) -> ScheduledBatch | None:
        seqs = []
        for s in cands:
            if s.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            while len(s.pages) < pages_for(s.num_computed + 1, self.cfg.page_size):
                if self.allocator.can_allocate(1):
                    s.pages += self.allocator.allocate(1)
                elif self._deferred:
                    s.pages.append(self._take_deferred())
                elif self.preempt(self.running[-1]) is s:
                    break
            if s.status is Status.RUNNING:
                seqs.append(s)
        return ScheduledBatch(seqs, [1] * len(seqs), is_decode=True) if seqs else None

    def preempt(self, seq: Sequence) -> Sequence:
        """Give a running sequence's pages back; it recomputes prompt + output when readmitted."""
        self.release(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        return seq

    def release(self, seq: Sequence) -> None:
        """Free a sequence's pages and drop it from the scheduler."""
        self.detach(seq)
        self.free(seq.pages)
        seq.pages = []

    def free(self, pages: list[int]) -> None:
        """Give pages back now, or once the step in flight (which may write them) is read."""
        if self.inflight_step is None:
            self.allocator.free(pages)
        elif pages:
            self._deferred.append((self.inflight_step, list(pages)))

    def _take_deferred(self) -> int:
        """A page held back for the step in flight, for the step being scheduled: that step
        takes the in-flight step's pool as input, so the device runs it after, and its
        writes land after the old ones. (Only the scheduler's own steps may do this; other
        writers, e.g. a NIXL transfer into pages the decode role allocates, wait.) Without
        it, a preemption under overlap freed nothing usable and preempted the whole batch."""
        _, pages = self._deferred[-1]
        page = pages.pop()
        if not pages:
            self._deferred.pop()
        return page

    def step_done(self, step_id: int) -> None:
        """The results of step ``step_id`` (and all before it) are read: free what waited."""
        if self.inflight_step == step_id:
            self.inflight_step = None
        keep = []
        for sid, pages in self._deferred:
            if sid <= step_id:
                self.allocator.free(pages)
            else:
                keep.append((sid, pages))
        self._deferred = keep

    def detach(self, seq: Sequence) -> None:
        """Drop a sequence from the scheduler but leave its pages allocated (the caller
        frees them later, e.g. once a transfer that reads them has finished)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose KV is already in its pages (P/D decode side)."""
        assert seq.pages and seq.num_computed > 0
        seq.status = Status.RUNNING
        self.running.append(seq)
