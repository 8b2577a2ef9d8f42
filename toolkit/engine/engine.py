"""The engine: add requests, step (schedule -> run -> postprocess), stream tokens."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from toolkit.cache.allocator import pages_for
from toolkit.cache.manager import CacheManager
from toolkit.cache.radix import hash_seed
from toolkit.cache.pool import PAGE_MAJOR, KVPool, PoolLayout
from toolkit.cache.state_pool import StateLayout, required_slots
from toolkit.cache.tiers import KVTiers, PoolMover, slots_for
from toolkit.config import validate as V
from toolkit.config.schema import CacheConfig, EngineConfig, ModelConfig
from toolkit.engine import compile_cache
from toolkit.engine.request import RequestOutput, SamplingParams, Sequence, Status
from toolkit.engine.runner import Launched, ModelRunner
from toolkit.engine.scheduler import Scheduler
from toolkit.models.checkpoint import Checkpoint
from toolkit.models.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def pool_pages(ecfg: EngineConfig, page_bytes_all_layers: int, fixed_bytes: int = 0) -> int:
    """engine.num_pages, or the pages that fit in memory_fraction of free device memory
    after ``fixed_bytes`` (the state pool of a hybrid model), which must fit."""
    if ecfg.memory_fraction == 0 or page_bytes_all_layers == 0:  # (no attention layer: pages hold nothing)
        return ecfg.num_pages
    from toolkit.cache.pool import resolve_alloc

    dev = jax.devices()[0]
    stats = dev.memory_stats()
    if not stats or "bytes_limit" not in stats:
        raise V.ConfigError("engine.memory_fraction needs a device that reports memory "
                            "(a GPU); on CPU set engine.num_pages")
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if resolve_alloc(ecfg.kv_alloc, dev) == "cuda_malloc":  # outside XLA's pool: ask the driver
        import torch

        # minus what XLA's allocator may still reserve up to its limit (it reserves its
        # whole arena at the first allocation unless XLA_PYTHON_CLIENT_PREALLOCATE=false):
        # counting that as free made the pool's second buffer fail to allocate
        xla_to_come = max(0, stats["bytes_limit"] - stats.get("pool_bytes", 0))
        free = torch.cuda.mem_get_info()[0] - xla_to_come
        if free <= 0:
            raise V.ConfigError("no device memory left for a cudaMalloc'd KV pool beside XLA's "
                                "arena; set XLA_PYTHON_CLIENT_MEM_FRACTION lower or engine.kv_alloc=xla")
    budget = int(free * ecfg.memory_fraction)
    if fixed_bytes >= budget:
        raise V.ConfigError(f"the recurrent-state pool needs {fixed_bytes / 2**30:.2f} GiB, more than "
                            f"engine.memory_fraction={ecfg.memory_fraction} of free device memory "
                            f"({budget / 2**30:.2f} GiB): raise engine.memory_fraction or lower "
                            "engine.max_batch_size / transfer.max_rooms")
    return max(2, (budget - fixed_bytes) // page_bytes_all_layers)


def state_slots(ecfg: EngineConfig, transfer_rooms: int) -> int:
    """The state pool's slots (padding slot included): what the role can hold at once; a
    configured engine.state_slots below that is raised, with a warning naming both (never
    capped: a pool smaller than the requirement fails admissions under full load)."""
    need = required_slots(ecfg.max_batch_size, transfer_rooms)
    if ecfg.state_slots and ecfg.state_slots < need:
        log.warning("engine.state_slots=%d is below what this worker can hold at once (%d: "
                    "engine.max_batch_size=%d running + %d transfer rooms + the padding slot); "
                    "raised to %d", ecfg.state_slots, need, ecfg.max_batch_size, transfer_rooms, need)
    return max(ecfg.state_slots, need)


def make_tiers(c: CacheConfig, page_layout: PoolLayout, seed: bytes) -> Optional[KVTiers]:
    """The host (and storage) tiers ``cache`` asks for, or None. ``page_layout``: one page."""
    if not (c.host_pages or c.host_gb):
        return None
    page_bytes = page_layout.total_bytes
    host = c.host_pages or slots_for(c.host_gb, page_bytes)
    if host < 1:
        raise V.ConfigError(f"cache.host_gb={c.host_gb} holds no page ({page_bytes} bytes each)")
    storage = slots_for(c.storage_gb, page_bytes) if c.storage == "file" else 0
    if c.storage == "file" and storage < 1:
        raise V.ConfigError(f"cache.storage_gb={c.storage_gb} holds no page ({page_bytes} bytes each)")
    try:
        return KVTiers(None, page_layout, host, seed, storage_path=c.storage_path if storage else "",
                       storage_slots=storage)
    except RuntimeError as e:  # the storage directory is another worker's
        raise V.ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What drivers (servers, P/D workers, benchmarks, tests) read about an engine."""

    waiting: int  # requests queued, not yet admitted (or preempted)
    running: int  # requests admitted: prefilling or decoding
    pages_used: int  # KV pages held by requests (or reserved for a P/D transfer) ...
    pages_held: int  # ... of which: a failed transfer's, until the peer can no longer write them
    pages_free: int
    pages_usable: int  # the pool's pages but the padding page
    pages_cached: int  # in the prefix cache (neither used nor free) ...
    pages_evictable: int  # ... of which no request holds these
    pages_evicted: int  # cached pages evicted to make room, so far
    cached_tokens: int  # prompt tokens served from the prefix cache so far
    num_preemptions: int
    num_compilations: int  # executables of the jitted step so far
    max_compilations: int  # the shapes of the bucket set: what a warmed-up engine holds
    compile_seconds: float  # host time spent compiling new shapes (or loading them)
    warmed_up: bool  # every shape of the bucket set compiled (Engine.warmup)
    xla_compiled: int  # this process's XLA compilations (every jitted function) ...
    xla_loaded: int  # ... and executables loaded from the persistent compile cache instead
    step_loaded: int  # step shapes warm-up loaded serialized (no trace, lower or compile)
    # the tiers below the prefix cache (cache.host_pages / cache.storage): slots, copies, traffic
    host_slots: int = 0
    host_slots_used: int = 0
    storage_slots: int = 0  # 0 also once storage turned itself off after a failed write
    storage_slots_used: int = 0
    copies_inflight: int = 0
    host_hit_tokens: int = 0  # prompt tokens loaded back from host / from storage
    storage_hit_tokens: int = 0
    offloaded_bytes_host: int = 0  # device -> host
    offloaded_bytes_storage: int = 0  # host -> file
    loaded_bytes_host: int = 0  # host -> device
    loaded_bytes_storage: int = 0  # file -> host
    # the recurrent-state pool of a hybrid model (0 without state): usable slots, free ones
    state_slots: int = 0
    state_slots_free: int = 0

    @property
    def idle(self) -> bool:
        """Nothing queued or running and every page (and state slot) back."""
        return (not self.waiting and not self.running and self.pages_used == 0
                and self.state_slots_free == self.state_slots)


@dataclasses.dataclass(frozen=True)
class WarmupReport:
    shapes: int  # step shapes run
    seconds: float
    compiled: int  # XLA compilations during warm-up ...
    loaded: int  # ... and executables loaded from JAX's compile cache instead
    stored: int = 0  # step shapes loaded serialized from the engine's store (none of the above)

    def __str__(self) -> str:
        return (f"{self.shapes} step shapes in {self.seconds:.1f} s ({self.stored} loaded from the "
                f"step store; {self.compiled} compiled, {self.loaded} loaded from the compile cache)")


class Engine:
    """The engine's public API is what drivers use: requests (``add_request``, ``abort``,
    ``add_prefilled``), the step (``step``, ``sync``), ``stats``, and for transfer
    backends the KV pool (``pool``, ``wait_for_kv``, ``read_pages``) and its pages
    (``can_reserve``/``reserve_pages``, ``release_reserved``). A request leaves the engine's
    table when it finishes; its ``Sequence`` object keeps the result."""

    def __init__(self, ckpt: Checkpoint, ecfg: EngineConfig, dtype=jnp.float32,
                 keep_pages_on_finish: bool = False, cache: CacheConfig | None = None,
                 prefill_only: bool = False, transfer_rooms: int = 0):
        """keep_pages_on_finish: finished requests keep their pages until ``release_pages``
        (the prefill role frees them once the KV transfer that reads them is done).
        cache: the prefix-cache policy (``cache.policy``: ``none`` or ``radix``).
        prefill_only: every request samples one token (the prefill role), so no decode step
        ever runs and the bucket set has no decode shapes to compile.
        transfer_rooms: a P/D worker's rooms (``transfer.max_rooms``), each of which may hold
        a state slot beside the running batch (models with recurrent state)."""
        V.validate_engine(ecfg)
        compile_cache.enable(ecfg.compile_cache_dir)  # before the first compilation
        self.cache_cfg = cache or CacheConfig()
        V.validate_cache(self.cache_cfg)
        V.validate_model_cache(ckpt.args, self.cache_cfg)
        self.keep_pages_on_finish = keep_pages_on_finish
        self.cfg = ecfg
        self.args = ckpt.args
        self.tokenizer: Tokenizer = ckpt.tokenizer
        self.max_model_len = ecfg.max_model_len or ckpt.args.max_position_embeddings
        # K and V of one page across all layers: what each page of the pool costs
        page_bytes = PoolLayout.for_model(self.args, 1, ecfg.page_size, dtype).total_bytes
        # a model with recurrent state: one state slot per request that may hold one at once
        num_slots = state_slots(ecfg, transfer_rooms) if self.args.has_state else 0
        slot_bytes = StateLayout.for_model(self.args, 1, dtype).total_slot_bytes if num_slots else 0
        num_pages = pool_pages(ecfg, page_bytes, fixed_bytes=num_slots * slot_bytes)
        # the one owner of pages (and state slots): allocator, prefix cache, deferred releases
        seed = hash_seed(dataclasses.asdict(self.args), jnp.dtype(dtype).name, ecfg.page_size, PAGE_MAJOR)
        self.kv = CacheManager(num_pages, ecfg.page_size, self.cache_cfg.policy, seed=seed,
                               num_state_slots=num_slots)
        # host / storage tiers (before the pool: a storage directory in use fails here)
        tiers = make_tiers(self.cache_cfg, PoolLayout.for_model(self.args, 1, ecfg.page_size, dtype), seed)
        self.scheduler = Scheduler(ecfg, self.kv, self.max_model_len)
        self.runner = ModelRunner(ckpt.args, ckpt.weights, ecfg, dtype, num_pages, self.max_model_len,
                                  decode_family=not prefill_only, num_state_slots=num_slots)
        if tiers is not None:
            tiers.mover = PoolMover(self.runner.pool)
            tiers.mover.warm(min(tiers.host.slots.num_slots, 256))
            self.kv.attach_tiers(tiers)
        log.info("bucket set: %s", self.runner.buckets.describe())
        self.seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        # Overlap: launch step N+1 before reading step N's tokens, so the host's work
        # (scheduling, inputs, dispatch, detokenizing) hides behind the device's. The
        # prefill role posts KV transfers right after each step, so it steps in lockstep.
        self.overlap = ecfg.overlap_schedule and not keep_pages_on_finish
        self._inflight: Launched | None = None
        self._unreported: list[Sequence] = []  # got a token in a sync() no step() returned

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, ecfg: EngineConfig, progress: bool = True,
                    keep_pages_on_finish: bool = False, cache: CacheConfig | None = None,
                    prefill_only: bool = False, transfer_rooms: int = 0) -> "Engine":
        """Validate everything first, then load weights, then allocate the pool."""
        from toolkit.models.loader import load_checkpoint

        V.validate_model(model_cfg)
        V.validate_engine(ecfg)
        V.validate_cache(cache or CacheConfig())
        V.validate_model_cache(model_cfg, cache or CacheConfig())  # (reads config.json only)
        dtype = resolve_dtype(model_cfg.dtype)
        # device-made random weights come in the model's dtype; the rest in float32 on the
        # host, cast once they are placed
        ckpt = load_checkpoint(model_cfg, dtype=dtype if model_cfg.random_on_device else np.float32,
                               progress=progress)
        return cls(ckpt, ecfg, dtype, keep_pages_on_finish=keep_pages_on_finish, cache=cache,
                   prefill_only=prefill_only, transfer_rooms=transfer_rooms)

    # ---- requests -------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None,
                    on_token: Optional[Callable[[Sequence, int, str], None]] = None) -> Sequence:
        params = params or SamplingParams()
        params.validate()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_fits(ids, params)
        seq = Sequence(ids, params, on_token=on_token)
        if request_id is not None:
            if request_id in self.seqs:
                raise ValueError(f"request id {request_id!r} is already in use")
            seq.request_id = request_id
        self.seqs[seq.request_id] = seq
        self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer)
        self.scheduler.add(seq)
        return seq

    def check_fits(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context holds {self.max_model_len} "
                             "(engine.max_model_len)")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.args.vocab_size})")
        need = pages_for(min(len(ids) + params.max_new_tokens, self.max_model_len), self.cfg.page_size)
        if need > self.kv.num_usable:
            raise ValueError(f"request needs up to {need} pages; the pool has {self.kv.num_usable}")

    def abort(self, request_id: str) -> Sequence | None:
        """Stop a request; its pages are freed unless keep_pages_on_finish (then: release_pages).
        Returns the request it stopped, or None if none by that id is unfinished."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return None
        self._retire(seq, keep=False)
        self._finish(seq, "abort")
        return seq

    def release_pages(self, seq: Sequence, keep: bool = True) -> None:
        """Give back a finished request's pages (keep_pages_on_finish: the prefill role, once
        its transfers have ended). With ``keep`` its computed KV enters the prefix cache;
        the rest is freed and its cache lock dropped."""
        self.kv.release(seq.token_ids[:seq.num_computed], seq.pages, seq.cache_node, keep=keep,
                        slot=seq.state_slot)
        seq.pages, seq.cache_node, seq.state_slot = [], None, 0

    # Pages for a request whose KV another worker writes (P/D decode side), recorded under
    # an owner (the room). Predicate and mutator: reserve only what ``can_reserve`` allows.
    def can_reserve(self, num_pages: int) -> bool:
        """``num_pages`` pages, and a state slot for a model with recurrent state, are free."""
        return self.kv.can_allocate(num_pages) and self.kv.can_allocate_slot()

    def reserve_pages(self, owner, num_pages: int) -> list[int]:
        """Pages a transfer will write, and for a model with recurrent state the state slot
        it writes too (``reserved_state_slots``); they pass to the request in
        ``add_prefilled`` (``reservation=owner``) or come back with ``release_reserved``."""
        return self.kv.reserve(owner, num_pages, state=self.kv.has_state)

    def reserved_state_slots(self, owner) -> list[int]:
        """The state slots reserved with ``owner``'s pages: ``[slot]`` for a model with state,
        ``[]`` for one without (what the room's metadata sends: empty means no state)."""
        slot = self.kv.reserved_slot(owner)
        return [slot] if slot else []

    def release_reserved(self, owner, hold_s: float = 0.0) -> None:
        """The transfer into ``owner``'s pages will not be used. ``hold_s`` > 0 when the peer
        may still be writing: the pages stay out of use until ``end_hold(owner)`` or the
        time passes (``expire_holds``)."""
        self.kv.unreserve(owner, hold_s)

    def end_hold(self, owner) -> bool:
        """The peer confirmed no write into ``owner``'s held pages is in flight: free them."""
        return self.kv.end_hold(owner)

    def expire_holds(self) -> int:
        """Free the held pages whose time passed (a dead peer never writes); returns how many."""
        return self.kv.expire_holds()

    def holds_pages(self, owner) -> bool:
        """``owner`` still has pages reserved or held."""
        return self.kv.holds(owner)

    def close(self) -> None:
        """Wait for the tier copies in flight and close the storage tier (its index is on
        disk, for the next worker on the same cache.storage_path)."""
        self.kv.close()

    def poll_copies(self) -> int:
        """Observe the tier copies in flight without stepping (a driver with nothing to step
        calls it each tick: pages a finished copy pinned become evictable for admission).
        ``step`` does it too. Returns how many ended."""
        return self.kv.poll_copies()

    def wait_for_copies(self) -> int:
        """Block until every tier copy in flight has ended (their device pages unpinned);
        returns how many ended."""
        return self.kv.poll_copies(block=True)

    def flush_cache(self) -> int:
        """Evict every cached page no request holds back to the allocator (tests check the
        pool is whole; a driver may call it to drop the device cache) once the tier copies in
        flight have ended; the host and storage tiers keep their pages. Returns how many."""
        return self.kv.flush()

    def describe_prefix_cache(self, max_lines: int = 40) -> list[str]:
        """The prefix cache's tree as text lines ([] without a cache)."""
        return self.kv.describe(max_lines)

    def check_pages(self) -> None:
        """Raise AssertionError unless every usable page is in exactly one place: free, in
        the prefix cache, a request's, reserved for a transfer, held after a failed one, or
        waiting for the step in flight."""
        self.kv.check([s.pages for s in self.seqs.values()], [s.state_slot for s in self.seqs.values()])

    # The decode role's prefix cache: match a prompt before reserving pages for the rest.
    def match_prefix(self, prompt_ids: list[int]) -> tuple[object, list[int]]:
        """The cached whole pages of the longest prefix of ``prompt_ids`` (the whole prompt
        may match: prefill samples the first token), locked even when empty: hand the lock
        to ``add_prefilled`` or drop it with ``unlock_prefix``. (None, []) without a cache."""
        return self.kv.match(prompt_ids)

    def unlock_prefix(self, node: object) -> None:
        """Drop a ``match_prefix`` lock whose request will not run (its pages stay cached)."""
        self.kv.unlock_now(node)

    def add_prefilled(self, seq: Sequence, pages: list[int], token: int, logprob: float,
                      prefix_node: object = None, reservation=None) -> None:
        """Admit a request whose prompt KV is already in ``pages`` (a cached prefix from
        ``match_prefix``, whose lock ``prefix_node`` passes to the request, then the pages
        ``reservation`` holds, written by a prefill worker) together with its first token;
        it then decodes like any other. The request owns the pages from now on."""
        claimed, slot = self.kv.claim(reservation) if reservation is not None else ([], 0)
        assert pages[len(pages) - len(claimed):] == claimed, "pages do not end with the reservation"
        assert bool(slot) == self.kv.has_state, "a model with state needs the room's state slot"
        seq.pages, seq.num_computed, seq.cache_node = list(pages), seq.num_tokens, prefix_node
        seq.state_slot = slot
        self.scheduler.num_cached_tokens += seq.num_cached  # (the decode role sets it at match)
        self.seqs[seq.request_id] = seq
        self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer)
        self.scheduler.add_running(seq)
        self._append(seq, token, logprob)

    def _retire(self, seq: Sequence, keep: bool = True) -> None:
        """keep: its KV may enter the prefix cache (not for an aborted request)."""
        if self.keep_pages_on_finish:
            self.scheduler.detach(seq)
        else:
            self.scheduler.release(seq, keep=keep)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def stats(self) -> EngineStats:
        a, s, r = self.kv, self.scheduler, self.runner
        t = {}
        if a.tiers is not None:
            ts, S = a.tiers.stats(), self.cfg.page_size
            t = dict(host_slots=ts.host_slots, host_slots_used=ts.host_used, storage_slots=ts.storage_slots,
                     storage_slots_used=ts.storage_used, copies_inflight=ts.copies_inflight,
                     host_hit_tokens=ts.loaded_pages["host"] * S, storage_hit_tokens=ts.loaded_pages["storage"] * S,
                     offloaded_bytes_host=ts.offloaded_bytes["host"], offloaded_bytes_storage=ts.offloaded_bytes["storage"],
                     loaded_bytes_host=ts.loaded_bytes["host"], loaded_bytes_storage=ts.loaded_bytes["storage"])
        return EngineStats(**t, state_slots=a.num_state_slots, state_slots_free=a.num_free_slots,
                           waiting=len(s.waiting), running=len(s.running), pages_used=a.num_used,
                           pages_held=a.num_held,
                           pages_free=a.num_free, pages_usable=a.num_usable, pages_cached=a.num_cached,
                           pages_evictable=a.num_evictable, pages_evicted=a.num_evicted,
                           cached_tokens=s.num_cached_tokens,
                           num_preemptions=s.num_preemptions,
                           num_compilations=r.num_compilations, max_compilations=r.max_compilations,
                           compile_seconds=r.compile_seconds, warmed_up=r.warmed_up,
                           xla_compiled=(c := compile_cache.counts()).compiled, xla_loaded=c.loaded,
                           step_loaded=r.executables_loaded)

    # ---- start-up ----------------------------------------------------------------------

    def warmup(self, force: bool = False, progress: bool = True,
               on_progress: Callable[[int, int], None] | None = None) -> Optional["WarmupReport"]:
        """Compile every step shape of the bucket set (``engine.warmup``, or ``force``), so
        no request waits for a compilation; after it, a new shape logs a warning (the set
        is incomplete). Call it before the first request; ``on_progress(done, total)``
        follows it. Returns what it did, or None when warm-up is off."""
        if not (self.cfg.warmup or force):
            return None
        if self.has_unfinished():
            raise RuntimeError("warmup() runs before the first request (the engine has work)")
        t0, before, stored = time.perf_counter(), compile_cache.counts(), self.runner.executables_loaded
        ran = self.runner.warmup(progress=progress, on_progress=on_progress)
        if self.kv.tiers is not None:  # the tiers' page gathers and loads, every padded size
            self.kv.tiers.warm(pages_for(self.max_model_len, self.cfg.page_size))
        after = compile_cache.counts()
        rep = WarmupReport(shapes=ran, seconds=time.perf_counter() - t0,
                           compiled=after.compiled - before.compiled, loaded=after.loaded - before.loaded,
                           stored=self.runner.executables_loaded - stored)
        log.info("warm-up: %s", rep)
        return rep

    def bucket_set(self) -> list[str]:
        """The step shapes this engine compiles (what warm-up runs), in words."""
        return [str(s) for s in self.runner.buckets.shapes()]

    # ---- the KV pool, for transfer backends --------------------------------------

    @property
    def pool(self) -> KVPool:
        """The KV pool: its buffers' addresses never change (donated through every step),
        so a backend registers them once."""
        return self.runner.pool

    @property
    def state_pool(self):
        """The recurrent-state pool (``toolkit.cache.state_pool.StatePool``) of a hybrid
        model, None without state: like ``pool``, its addresses never change."""
        return self.runner.state_pool

    def wait_for_kv(self) -> None:
        """Block until every launched step's KV (and state) writes have landed (before a
        transfer reads the pools)."""
        jax.block_until_ready((self.runner.pool.k, self.runner.pool.v, self.runner.mstate))

    def read_state(self, slot: int) -> tuple[np.ndarray, ...]:
        """Host copies of one state slot, every Mamba2 layer: (conv, ssm); () without state."""
        return tuple(np.asarray(b[slot]) for b in self.runner.mstate)

    def read_pages(self, pages: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of K and V of ``pages`` in every layer: ([n, L, S, KV, Dh],) * 2."""
        idx = np.asarray(pages, np.int32)
        return np.asarray(self.runner.pool.k[idx]), np.asarray(self.runner.pool.v[idx])

    # ---- the step ----------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """One engine step; returns the sequences that got a token (with overlap: the
        tokens of the step launched by the previous call)."""
        self.kv.poll_copies()  # tier copies observed complete unpin their device pages
        batch = self.scheduler.schedule()
        launched = None
        if batch is not None:
            launched = self.runner.launch(batch, self._inflight)
            self.kv.inflight_step = launched.step_id
            for seq, n, smp in zip(batch.seqs, batch.num_tokens, launched.samples):
                seq.num_computed += n
                seq.num_inflight += smp
            if not self.keep_pages_on_finish:  # (prefill role: transfers read the pages; commit at release)
                self.scheduler.commit_prompts(batch)
                if self.cache_cfg.decode_offload:
                    self.scheduler.commit_decoded(batch)
        if self.overlap:
            done, self._inflight = self._inflight, launched
        else:
            done = launched
        out, self._unreported = self._unreported, []
        return out + (self._collect(done) if done is not None else [])

    def sync(self) -> list[Sequence]:
        """Read the step in flight (if any) without launching another: afterwards every
        token computed so far is appended and every freed page is back in the allocator."""
        done, self._inflight = self._inflight, None
        return self._collect(done) if done is not None else []

    def _collect(self, done: Launched) -> list[Sequence]:
        tokens, logprobs = self.runner.collect(done)
        out = []
        for seq, smp, tok, lp in zip(done.batch.seqs, done.samples, tokens, logprobs):
            if not smp:
                continue
            seq.num_inflight -= 1
            if seq.is_finished:  # stopped (or aborted) while this step ran: its token is surplus
                continue
            self._append(seq, int(tok), float(lp))
            out.append(seq)
        self.scheduler.step_done(done.step_id)
        return out

    def _append(self, seq: Sequence, tok: int, lp: float) -> None:
        seq.output_ids.append(tok)
        seq.output_logprobs.append(lp)
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        p = self.tokenizer
        reason = None
        stop_ids = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(p.eos_token_ids))
        if tok in stop_ids:
            reason = "stop"
        else:
            self._detok[seq.request_id].add(tok)
        full = self._detok[seq.request_id].text
        cut = min((i for i in (full.find(s) for s in seq.params.stop) if i >= 0), default=-1)
        if cut >= 0:
            full, reason = full[:cut], "stop"
        if reason is None and seq.at_length_limit(self.max_model_len):
            reason = "length"
        # Hold back text that could be the start of a stop string until it is decided.
        hold = 0 if reason else max((len(s) - 1 for s in seq.params.stop), default=0)
        visible = full[:max(len(seq.text), len(full) - hold)]
        delta, seq.text = visible[len(seq.text):], visible
        if seq.on_token is not None:
            seq.on_token(seq, tok, delta)
        if reason:
            self._retire(seq)
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Retire a request: it leaves the engine's table (the caller's Sequence keeps the
        result), so no driver has to remember to drop it."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        seq.finish_time = time.perf_counter()
        self._detok.pop(seq.request_id, None)
        if self.seqs.get(seq.request_id) is seq:
            del self.seqs[seq.request_id]

    # ---- conveniences ------------------------------------------------------------

    def run_until_done(self) -> None:
        while self.has_unfinished():
            self.step()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Submit all prompts at once (continuous batching) and wait for all of them."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, _copy(sp)) for p, sp in zip(prompts, plist)]
        self.run_until_done()
        return [RequestOutput.of(s) for s in seqs]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one request as they are produced (steps the engine itself)."""
        deltas: list[str] = []
        seq = self.add_request(prompt, _copy(params), on_token=lambda s, t, d: deltas.append(d))
        try:
            while not seq.is_finished:
                # other requests' tokens: the next step() a driver calls reports them
                self._unreported += [s for s in self.step() if s is not seq]
                while deltas:
                    d = deltas.pop(0)
                    if d:
                        yield d
        finally:
            if not seq.is_finished:
                self.abort(seq.request_id)
            self._unreported += [s for s in self.sync() if s is not seq]

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)

    def page_table(self, request_id: str) -> list[int]:
        """The pages of an unfinished request, in order."""
        return list(self.seqs[request_id].pages)

    @property
    def num_compilations(self) -> int:
        return self.runner.num_compilations


def _copy(params: SamplingParams | None) -> SamplingParams:
    return dataclasses.replace(params) if params is not None else SamplingParams()
