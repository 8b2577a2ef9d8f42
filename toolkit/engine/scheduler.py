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
is handed out while a write into it may still be pending (the CacheManager defers them).

With a prefix cache, admission starts a request at its longest cached whole-page prefix
(never its last token: that token's logits give the next one), a request whose prompt is
computed commits its pages to the cache, and a released one (finished or preempted)
commits what it computed, so a recomputed request finds its own KV again.
"""

from __future__ import annotations

from collections import deque

from toolkit.cache.allocator import pages_for
from toolkit.cache.manager import CacheManager
from toolkit.config.schema import EngineConfig
from toolkit.engine.request import Sequence, Status
from toolkit.engine.batch import ScheduledBatch


class Scheduler:
    def __init__(self, ecfg: EngineConfig, cache: CacheManager, max_model_len: int):
        self.cfg = ecfg
        self.cache = cache  # the one owner of pages
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._last_was_prefill = False
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admissions

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
            node, cached = self.cache.match(s.token_ids[:s.num_tokens - 1])
            need = pages_for(s.num_tokens, self.cfg.page_size) - len(cached)
            # (pages checked with the match locked: not evictable; a model with recurrent
            # state needs a free state slot too, else the request waits)
            if not (self.cache.can_allocate(need) and self.cache.can_allocate_slot()):
                self.cache.unlock_now(node)
                break
            self.waiting.popleft()
            s.pages, s.cache_node, s.status = cached + self.cache.allocate(need), node, Status.RUNNING
            s.state_slot = self.cache.allocate_slot()
            s.num_computed = len(cached) * self.cfg.page_size
            if s.num_preemptions == 0:
                s.num_cached = s.num_computed
                self.num_cached_tokens += s.num_cached
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
                if self.cache.can_allocate(1):
                    s.pages += self.cache.allocate(1)
                elif self.cache.has_deferred_page():
                    s.pages.append(self.cache.take_deferred_page())
                elif self.preempt(self.running[-1]) is s:
                    break
            if s.status is Status.RUNNING:
                seqs.append(s)
        return ScheduledBatch(seqs, [1] * len(seqs), is_decode=True) if seqs else None

    def preempt(self, seq: Sequence) -> Sequence:
        """Give a running sequence's pages back; it recomputes prompt + output when
        readmitted (from what the prefix cache kept of them, if there is one)."""
        self.release(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        return seq

    def release(self, seq: Sequence, keep: bool = True) -> None:
        """Drop a sequence from the scheduler and give its pages back; with ``keep`` its
        computed KV enters the prefix cache first (not for an aborted request)."""
        self.detach(seq)
        self.cache.release(seq.token_ids[:seq.num_computed], seq.pages, seq.cache_node, keep=keep,
                           slot=seq.state_slot)
        seq.pages, seq.cache_node, seq.state_slot = [], None, 0

    def commit_prompts(self, batch: ScheduledBatch) -> None:
        """After a prefill step is launched: a sequence whose prompt it completes puts the
        prompt's whole pages into the prefix cache (a step launched later reads them after
        this one wrote them: one device, one stream), so requests sharing the prefix reuse
        it while this one still decodes."""
        if not self.cache.has_cache or batch.is_decode:
            return
        for s in batch.seqs:
            if s.num_computed >= len(s.prompt_ids) and s.status is Status.RUNNING:
                s.pages, s.cache_node = self.cache.commit(s.token_ids[:s.num_computed], s.pages, s.cache_node)

    def commit_decoded(self, batch: ScheduledBatch) -> None:
        """cache.decode_offload: after a decode step is launched, a sequence whose computed
        tokens fill a new whole page commits its pages (prompt and generated tokens but the
        last) to the tree, which copies them down to the tiers while it keeps decoding."""
        if not batch.is_decode:
            return
        S = self.cfg.page_size
        for s in batch.seqs:
            done = min(s.num_computed, s.num_tokens) // S  # tokens known and their KV launched
            if done > s.num_committed_pages and s.status is Status.RUNNING:
                s.pages, s.cache_node = self.cache.commit(s.token_ids[:done * S], s.pages, s.cache_node)
                s.num_committed_pages = done

    def free(self, pages: list[int]) -> None:
        """Give pages back now, or once the step in flight (which may write them) is read."""
        self.cache.free(pages)

    def step_done(self, step_id: int) -> None:
        """The results of step ``step_id`` (and all before it) are read: free what waited."""
        self.cache.step_done(step_id)

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
