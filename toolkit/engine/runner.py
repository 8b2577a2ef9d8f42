"""Model runner: owns the parameters, the KV pool and (hybrid models) the state pool, pads
a scheduled batch to bucketed shapes and runs the jitted step with the pools donated."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import logging
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from kernels.attention import get_backend
from toolkit.cache.allocator import pages_for
from toolkit.cache.pool import KVPool, PoolLayout
from toolkit.cache.state_pool import StateLayout, StatePool
from toolkit.config.schema import EngineConfig
from toolkit.engine import compile_cache
from toolkit.engine.buckets import BucketSet, StepShape
from toolkit.engine.request import Sequence
from toolkit.engine.sampler import SamplingInputs, sample
from toolkit.engine.batch import ScheduledBatch
from toolkit.engine.inputs import StepInputs
from toolkit.models import llama
from toolkit.models.llama import Llama, unroll_layers
from toolkit.models.spec import ModelArgs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Launched:
    """A step on its way: results stay on the device until ``ModelRunner.collect``."""

    step_id: int
    batch: ScheduledBatch
    samples: list[bool]  # per sequence: does this step's sample count (its chunk ends the tokens)?
    tokens_dev: jax.Array  # [P] int32, padded to the most sequences any step has
    logprobs_dev: jax.Array  # [B] float32
    rows: dict[int, int]  # id(seq) -> row of its sample, for the sequences that sample


def _step(leaves, k_pool, v_pool, mstate, inp, samp, feed_rows, prev_tokens, *, graphdef, treedef, attn,
          max_q_len, do_sample, hybrid_model):
    """feed_rows [T] int32: for a token still on the device, its row in prev_tokens [P]
    (the previous step's samples), else -1. Returns tokens padded to [P] (the next
    step's prev_tokens: one shape for every step, so no extra compilations).
    mstate: the state pool's buffers (conv, ssm) of a hybrid model, () for a Llama."""
    state = jax.tree.unflatten(treedef, leaves)
    tokens = jnp.where(feed_rows >= 0, prev_tokens[jnp.maximum(feed_rows, 0)], inp.tokens)
    inp = dataclasses.replace(inp, tokens=tokens)
    if hybrid_model:
        from toolkit.models import hybrid

        logits, k_pool, v_pool, mstate = hybrid.forward(graphdef, state, k_pool, v_pool, mstate, inp,
                                                        attn=attn, max_q_len=max_q_len)
    else:
        logits, k_pool, v_pool = llama.forward(graphdef, state, k_pool, v_pool, inp, attn=attn,
                                               max_q_len=max_q_len)
    tok, lp = sample(logits, samp, do_sample=do_sample)
    return jnp.zeros_like(prev_tokens).at[:tok.shape[0]].set(tok), lp, k_pool, v_pool, mstate


class ModelRunner:
    def __init__(self, args: ModelArgs, weights: dict[str, np.ndarray], ecfg: EngineConfig,
                 dtype, num_pages: int, max_model_len: int, decode_family: bool = True,
                 num_state_slots: int = 0):
        """decode_family: False for a prefill-only engine (no decode shapes in its set).
        num_state_slots: the state pool's slots (padding slot included) of a model with
        recurrent state."""
        self.args = args
        self.page_size = ecfg.page_size
        unroll = unroll_layers(ecfg.layer_loop, jax.devices()[0].platform)
        if args.is_hybrid:  # attention and Mamba2 layers: toolkit/models/hybrid.py
            from toolkit.models.hybrid import Hybrid

            model = Hybrid(args, weights, dtype, unroll_layers=unroll)
        else:
            model = Llama(args, weights, dtype, unroll_layers=unroll)
        self.graphdef, self.state = nnx.split(model)
        # The weights as a flat list, flattened once: the nnx.State pytree flattens in
        # Python on every call (~300 leaves with unrolled layers), a list in C++.
        self._leaves, treedef = jax.tree.flatten(self.state)
        self.pool = KVPool(PoolLayout.for_model(args, num_pages, ecfg.page_size, dtype), alloc=ecfg.kv_alloc)
        self.state_pool = (StatePool(StateLayout.for_model(args, num_state_slots, dtype), alloc=ecfg.kv_alloc)
                           if args.has_state else None)
        self._pool_ptrs = self._pointers()
        attn = get_backend(ecfg.attention_backend)
        self.buckets = BucketSet.from_config(ecfg, pages_for(max_model_len, ecfg.page_size),
                                             kernels=attn.name == "pallas", decode_family=decode_family)
        self._fn = jax.jit(
            functools.partial(_step, graphdef=self.graphdef, treedef=treedef, attn=attn,
                              hybrid_model=args.is_hybrid),
            static_argnames=("max_q_len", "do_sample"), donate_argnames=("k_pool", "v_pool", "mstate"))
        # The step's executables by shape, compiled ahead of time from the traced step (or
        # loaded from the store): by warm-up, or by ``_run`` for a shape met first there.
        # Calling a Compiled checks its arguments' shapes and dtypes: a batch that does not
        # match its bucket fails instead of compiling again.
        self._exe: dict[StepShape, jax.stages.Compiled] = {}
        self._compile_threads = ecfg.compile_threads or min(8, os.cpu_count() or 1)
        self.executables_loaded = 0  # shapes warm-up loaded from the store (no trace, no compile)
        self.compile_seconds = 0.0
        self.warmed_up = False  # every shape of the set compiled: a new one is a bug, logged
        self._num_launched = 0
        # Committed to the pool's device like every step's own tokens output (a committed
        # and an uncommitted argument are two cache entries of the jitted step).
        self._no_prev = jax.device_put(
            np.zeros(max(self.buckets.batch[-1], self.buckets.prefill_seqs[-1]), np.int32), self.pool.k.sharding)
        # What the traced step depends on besides the step shape (and the code, JAX and the
        # device, which program_fingerprint adds): the model and its dtype, the attention
        # backend and layer loop, and the avals of every argument the shape leaves open.
        # Not the rest of the engine config: two configs with the same programs share them.
        self._store = compile_cache.StepExecutables(
            os.path.abspath(os.path.expanduser(ecfg.compile_cache_dir)) if ecfg.compile_cache_dir else None,
            compile_cache.program_fingerprint(
                model=dataclasses.asdict(args), dtype=jnp.dtype(dtype).name, attention=attn.name, unroll=unroll,
                pool=[self.pool.k.shape, str(self.pool.k.dtype)], prev_tokens=self._no_prev.shape,
                state=[(x.shape, str(x.dtype)) for x in self.mstate],
                weights=[(x.shape, str(x.dtype)) for x in self._leaves]))

    @property
    def mstate(self) -> tuple:
        """The state pool's buffers as the step takes them ((conv, ssm), or () without state)."""
        return self.state_pool.buffers if self.state_pool is not None else ()

    def _set_mstate(self, mstate: tuple) -> None:
        if self.state_pool is not None:
            self.state_pool.conv, self.state_pool.ssm = mstate

    def _pointers(self) -> tuple[int, ...]:
        """Every pool buffer's device address (KV, then state)."""
        state = self.state_pool.buffer_pointers() if self.state_pool is not None else ()
        return self.pool.buffer_pointers() + state

    @property
    def max_compilations(self) -> int:
        """The step's executables once every shape of the bucket set has run."""
        return len(self.buckets)

    @property
    def num_compilations(self) -> int:
        """Executables of the step held (compiled or loaded)."""
        return len(self._exe)

    def launch(self, batch: ScheduledBatch, prev: Launched | None = None) -> Launched:
        """Dispatch the step without waiting for it. A sequence whose next token is still
        on the device (sampled by ``prev``, not yet collected) is fed from ``prev``."""
        shape, inp, samp, feed_rows = self._prepare(batch, prev)
        tok, lp = self._run(shape, inp, samp, feed_rows, self._no_prev if prev is None else prev.tokens_dev)
        # Transfer backends registered these addresses once; a step that moved the pool
        # would make them write into freed memory.
        assert self._pointers() == self._pool_ptrs, "KV or state pool moved: donation failed"
        samples = [s.num_computed + k == s.num_tokens + s.num_inflight
                   for s, k in zip(batch.seqs, batch.num_tokens)]
        rows = {id(s): i for i, (s, smp) in enumerate(zip(batch.seqs, samples)) if smp}
        self._num_launched += 1
        return Launched(self._num_launched, batch, samples, tok, lp, rows)

    def _run(self, shape: StepShape, inp: StepInputs, samp: SamplingInputs, feed_rows, prev_tokens):
        """Run the step's executable for ``shape`` (the pool donated and taken back). A shape
        met for the first time is loaded from the store or compiled here, timed apart from
        serving time; after warm-up that is a bug of the bucket set, logged as a warning."""
        args = (inp, samp, feed_rows, prev_tokens)
        exe = self._exe.get(shape)
        if exe is None:
            if self.warmed_up:
                log.warning("compiling a step shape after warm-up: %s (not in the bucket set: %s)",
                            shape, self.buckets.describe())
            else:
                log.info("compiling step: %s", shape)
            t0 = time.perf_counter()
            exe = self._store.load(shape)
            if exe is None:
                exe, fresh = compile_cache.compile_fresh(self._lower(shape, args))
                if fresh:
                    self._store.save(shape, exe)
            else:
                self.executables_loaded += 1
            self._exe[shape] = exe
            self.compile_seconds += time.perf_counter() - t0
        tok, lp, self.pool.k, self.pool.v, mstate = self._dispatch(shape, exe, self._leaves, self.pool.k,
                                                                   self.pool.v, self.mstate, *args)
        self._set_mstate(mstate)
        return tok, lp

    def _dispatch(self, shape: StepShape, exe: jax.stages.Compiled, *args):
        """The one place an executable of the step is called (the decode benchmark's probe
        records decode calls here)."""
        return exe(*args)

    def _lower(self, shape: StepShape, args: tuple) -> jax.stages.Lowered:
        """Trace and lower the step for ``shape`` with these (inputs, sampling, feed_rows,
        prev_tokens): their shapes and dtypes are the executable's."""
        return self._fn.lower(self._leaves, self.pool.k, self.pool.v, self.mstate, *args,
                              max_q_len=shape.max_q_len, do_sample=shape.sample)

    def _padding(self, shape: StepShape):
        """The step's dynamic arguments for a batch of padding: no sequence has a query, so
        every KV write lands in the padding page 0 and nothing is read back."""
        T, B, W = shape.T, shape.B, shape.W
        inp = StepInputs(*(np.zeros(T, np.int32) for _ in range(3)), np.zeros((B, W), np.int32),
                         np.zeros(B + 1, np.int32), np.zeros(B, np.int32), np.zeros(B, np.int32),
                         np.zeros(B, np.int32))
        return inp, self._sampling([], B), np.full(T, -1, np.int32), self._no_prev

    def warmup(self, progress: bool = True, on_progress: Callable[[int, int], None] | None = None) -> int:
        """Make an executable for every shape of the bucket set not met yet, then run each
        once on padding; ``on_progress(done, total)`` after each shape is ready (always on
        this thread). Returns how many shapes it made. The engine must be idle.

        A shape is loaded from the store of serialized executables when it is there (no
        tracing, lowering or compiling; loads run on the threads below, side by side); else
        it is traced and lowered here (Python, one at a time) and compiled on
        ``engine.compile_threads`` threads (XLA releases the GIL, so compiles overlap each
        other and the next lowering), then stored."""
        todo = [sh for sh in self.buckets.shapes() if sh not in self._exe]
        bar = tqdm(total=len(todo), desc="compiling step shapes", unit="shape", file=sys.stderr,
                   disable=not progress or not todo)
        t0, done = time.perf_counter(), 0

        def ready(shape: StepShape, exe, fresh: bool) -> None:
            nonlocal done
            self._exe[shape] = exe
            if fresh:
                self._store.save(shape, exe)
            done += 1
            bar.update()
            if on_progress is not None:
                on_progress(done, len(todo))

        with cf.ThreadPoolExecutor(self._compile_threads, thread_name_prefix="compile") as pool:
            # loads from the store first, all at once (each is mostly loading kernels onto the device)
            loads = {sh: pool.submit(self._store.load, sh) for sh in todo} if self._store.dir else {}
            pending: dict[cf.Future, StepShape] = {}
            for shape in todo:
                exe = loads[shape].result() if shape in loads else None
                if exe is not None:
                    self.executables_loaded += 1
                    ready(shape, exe, fresh=False)
                    continue
                lowered = self._lower(shape, self._padding(shape))
                pending[pool.submit(compile_cache.compile_fresh, lowered)] = shape
                for fut in [f for f in pending if f.done()]:  # report progress as compiles finish
                    ready(pending.pop(fut), *fut.result())
            for fut in cf.as_completed(pending):
                ready(pending[fut], *fut.result())
        bar.close()
        for shape in todo:  # run each once: a broken executable fails here, not on a request
            self._run(shape, *self._padding(shape))
            jax.block_until_ready((self.pool.k, self.pool.v, self.mstate))
        self.compile_seconds += time.perf_counter() - t0
        self.warmed_up = True
        return len(todo)

    def collect(self, launched: Launched) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a launched step; its sampled tokens and logprobs, one per sequence."""
        n = len(launched.batch.seqs)
        tok, lp = jax.device_get((launched.tokens_dev, launched.logprobs_dev))
        return tok[:n], lp[:n]

    def _prepare(self, batch: ScheduledBatch, prev: Launched | None = None):
        S, n = self.page_size, len(batch.seqs)
        kv_end = [s.num_computed + k for s, k in zip(batch.seqs, batch.num_tokens)]
        pages = max(pages_for(e, S) for e in kv_end)
        sample = any(s.params.temperature > 0 for s in batch.seqs)
        if batch.is_decode:
            shape = self.buckets.decode_shape(n, pages, sample)
        else:
            shape = self.buckets.prefill_shape(sum(batch.num_tokens), n, pages)
        T, B, maxP = shape.T, shape.B, shape.W
        tokens, positions, slots = (np.zeros(T, np.int32) for _ in range(3))
        page_table = np.zeros((B, maxP), np.int32)
        cu = np.zeros(B + 1, np.int32)
        kv_lens, logits_idx, state_slots = np.zeros(B, np.int32), np.zeros(B, np.int32), np.zeros(B, np.int32)
        feed_rows = np.full(T, -1, np.int32)  # [T] row of prev's samples holding the token
        off = 0
        for i, (seq, k) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed
            num_pages = pages_for(start + k, S)
            page_table[i, :num_pages] = seq.pages[:num_pages]
            known = seq.known_tokens(start, start + k)
            tokens[off:off + len(known)] = known
            if len(known) < k:  # the last one is the token the previous step sampled
                assert len(known) == k - 1 and seq.num_inflight == 1 and id(seq) in prev.rows
                feed_rows[off + k - 1] = prev.rows[id(seq)]
            if k == 1:  # decode: plain ints (this loop runs for every sequence every step)
                positions[off], slots[off] = start, seq.pages[start // S] * S + start % S
            else:
                pos = np.arange(start, start + k)
                positions[off:off + k] = pos
                slots[off:off + k] = page_table[i, pos // S] * S + pos % S
            off += k
            cu[i + 1], kv_lens[i], logits_idx[i], state_slots[i] = off, start + k, off - 1, seq.state_slot
        cu[n + 1:] = off  # padding sequences: zero queries
        # numpy, not device arrays: the jitted call moves them in one go (separate
        # jnp.asarray calls cost ~0.2 ms each on a GPU, measured ~3 ms a step)
        inp = StepInputs(tokens, positions, slots, page_table, cu, kv_lens, logits_idx, state_slots)
        return shape, inp, self._sampling(batch.seqs, B), feed_rows

    @staticmethod
    def _sampling(seqs: list[Sequence], B: int) -> SamplingInputs:
        pad = B - len(seqs)
        col = lambda f, dt: np.asarray([f(s) for s in seqs] + [0] * pad, dt)  # noqa: E731
        return SamplingInputs(
            temperature=col(lambda s: s.params.temperature, np.float32),
            top_k=col(lambda s: s.params.top_k, np.int32),
            top_p=np.asarray([s.params.top_p for s in seqs] + [1.0] * pad, np.float32),
            seeds=col(lambda s: s.seed, np.uint32),
            counters=col(lambda s: len(s.output_ids) + s.num_inflight, np.int32))
