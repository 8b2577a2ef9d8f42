"""Instrumentation of one engine for the decode benchmark (``toolkit.bench.decode``).

The benchmark needs two things the engine's public API does not give, and should not:
the host time of each part of a step (schedule, input building, dispatch, reading back)
and the last decode step's executable and arguments, to issue it again with nothing of the
engine around it (the device-only time of a step). Both live here, inside the engine
package, so no driver reads the engine's internals.

    probe = StepProbe(engine)       # wraps the parts; engine behaviour is unchanged
    probe.reset()                   # before the timed steps
    ...engine.step() x N...
    probe.part_ms(N)                # {"schedule_ms": ..., "prepare_ms": ..., ...}
    call = probe.last_decode()      # the last decode step's call (None before any)
    replay = probe.replay(call)     # re-issue it: replay.step() / synced_step() / pipelined_step()
    replay.close()                  # the pool goes back to the engine
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax
import numpy as np


# (attribute of the engine, method): the host-side parts of a step, and their column names
PARTS = (("scheduler", "schedule", "schedule_ms"), ("runner", "_prepare", "prepare_ms"),
         ("runner", "launch", "launch_ms"), ("runner", "collect", "collect_ms"))


@dataclasses.dataclass
class DecodeCall:
    """A decode step's executable and its arguments: (weights, k_pool, v_pool, inputs,
    sampling, feed_rows, prev_tokens). Its pools were donated; a replay uses the live ones."""

    exe: Any
    args: tuple

    @property
    def num_rows(self) -> int:
        """Rows of the step's batch (the padded batch bucket)."""
        return int(self.args[4].kv_lens.shape[0])


class StepProbe:
    def __init__(self, engine):
        self._engine = engine
        self._runner = engine.runner
        self._last: dict[str, DecodeCall] = {}
        dispatch = self._runner._dispatch

        def spy(shape, exe, *args):  # records decode calls, forwards everything
            if shape.decode:
                self._last["call"] = DecodeCall(exe, args)
            return dispatch(shape, exe, *args)

        self._runner._dispatch = spy
        self._spent: dict[str, float] = {}
        for owner, name, col in PARTS:
            self._time(getattr(engine, owner), name, col)

    def _time(self, obj, name: str, col: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._spent[col] = self._spent.get(col, 0.0) + time.perf_counter() - t0
        setattr(obj, name, timed)

    def reset(self) -> None:
        """Forget the part timings and the recorded decode call."""
        self._spent.clear()
        self._last.clear()

    def part_ms(self, num_steps: int) -> dict[str, float]:
        """Host milliseconds per step in each part since ``reset``."""
        return {col: self._spent.get(col, 0.0) / num_steps * 1e3 for _, _, col in PARTS}

    def last_decode(self) -> Optional[DecodeCall]:
        return self._last.get("call")

    def padded_batch(self, num_seqs: int) -> int:
        """The batch bucket a decode step of ``num_seqs`` sequences runs at."""
        return self._runner.buckets.decode_shape(num_seqs, 1, False).B

    def replay(self, call: DecodeCall) -> "Replay":
        """Re-issue ``call`` on the engine's live pool; nothing else of the engine runs.
        The engine must be idle (synced) until ``Replay.close``."""
        return Replay(call, self._engine.pool, self._runner.state_pool)


class Replay:
    """The recorded decode step issued again and again with the same inputs, the KV pool
    threaded through (donated, as the engine does). Three ways of issuing it:

    step            not waited on: back to back, the device-only time of a step
    synced_step     waited on every time: what the engine does, minus its host work
    pipelined_step  as the overlapped engine: call N+1 (its tokens fed on the device from
                    call N's samples), then read call N's tokens
    """

    def __init__(self, call: DecodeCall, pool, state_pool=None):
        self._fn, self._pool, self._state_pool = call.exe, pool, state_pool
        self._state, _, _, _, self._inp, self._samp, self._feed, self._prev_tok = call.args
        # the live buffers (the recorded call's were donated): the KV pool and the state pool
        self.k, self.v = pool.k, pool.v
        self.mstate = state_pool.buffers if state_pool is not None else ()
        self.dispatch_s: list[float] = []  # host time until each ``step`` call returned
        self._feed_all = np.arange(self._inp.tokens.shape[0], dtype=np.int32)
        self._prev: Optional[tuple] = None

    def _call(self, feed, prev_tok) -> tuple:
        tok, lp, self.k, self.v, self.mstate = self._fn(self._state, self.k, self.v, self.mstate, self._inp,
                                                        self._samp, feed, prev_tok)
        return tok, lp

    def step(self):
        t0 = time.perf_counter()
        tok, _ = self._call(self._feed, self._prev_tok)
        self.dispatch_s.append(time.perf_counter() - t0)
        return tok

    def synced_step(self):
        out = self._call(self._feed, self._prev_tok)
        return jax.device_get(out)

    def pipelined_step(self):
        if self._prev is None:
            self._prev = self._call(self._feed_all, self._prev_tok)
        cur = self._call(self._feed_all, self._prev[0])
        jax.device_get(self._prev)
        self._prev = cur
        return cur

    def close(self) -> None:
        """Wait for the last call and hand the (donated, re-threaded) pool back to the engine."""
        jax.block_until_ready((self.k, self.v, self.mstate))
        self._prev = None
        self._pool.k, self._pool.v = self.k, self.v
        if self._state_pool is not None:
            self._state_pool.conv, self._state_pool.ssm = self.mstate
