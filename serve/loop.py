"""The engine-side loop of a server: one thread owns the worker and calls ``tick()``.

HTTP handlers never touch the engine: they hand closures to the loop thread
(``call``) and receive events through asyncio queues (``emit``), so the engine,
the scheduler and the transfer backend stay single-threaded.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)


FAILED = "failed"  # the prefix of EngineLoop.starting when warm-up raised


def health_status(reason: str) -> str:
    """The /health status of a loop that is not ready: ``failed`` or ``starting``."""
    return FAILED if reason.startswith(FAILED) else "starting"


class EngineLoop:
    """The worker's thread. It first warms the worker up (``worker.warmup(on_progress)``:
    the engine compiles its bucket set, when ``engine.warmup``), answering calls between
    shapes; ``starting`` says why it is not ready yet (None once it is). HTTP handlers
    refuse work while ``starting`` is set, so only read-only calls (stats) run then."""

    def __init__(self, worker, idle_sleep_s: float = 0.001):
        self.worker = worker
        self.starting: str | None = "starting: the engine loop has not started"
        self._calls: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._idle_sleep = idle_sleep_s
        # events emitted on the loop thread, per asyncio loop, until the next _flush
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        self.thread = threading.Thread(target=self._run, name=f"{worker.role}-loop", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    def call(self, fn: Callable[[], Any]) -> "asyncio.Future":
        """Run fn on the loop thread; the returned future resolves with its result or error."""
        aloop = asyncio.get_running_loop()
        fut = aloop.create_future()
        self._calls.put((fn, aloop, fut))
        return fut

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run fn on the loop thread, not waiting for it (its result and errors are dropped;
        errors are logged)."""
        self._calls.put((fn, None, None))

    def emit(self, aloop: asyncio.AbstractEventLoop, q: asyncio.Queue, item: Any) -> None:
        """Put ``item`` on ``q``, an asyncio queue of ``aloop``. From the loop thread the
        item waits in an outbox until the tick (or call) that made it is over, and then every
        pending item of that asyncio loop crosses in one hop (``_flush``): one wake-up of the
        event loop per step rather than one per token (at 128 streams, 128 self-pipe writes
        and callbacks a step, contending with the engine's own host work for the GIL)."""
        if threading.current_thread() is self.thread:
            self._outbox.setdefault(aloop, []).append((q, item))
        else:
            aloop.call_soon_threadsafe(q.put_nowait, item)

    def _flush(self) -> None:
        box, self._outbox = self._outbox, {}
        for aloop, items in box.items():
            try:
                aloop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                log.debug("dropped %d events for a closed event loop", len(items))

    def _drain(self) -> None:
        while True:
            try:
                fn, aloop, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            res, err = None, None
            try:
                res = fn()
            except Exception as e:  # the caller gets the error; the loop goes on
                err = e
                if fut is None:
                    log.exception("call on the loop thread failed")
            self._flush()  # what the call emitted reaches its queues before its caller hears back
            if fut is not None:
                aloop.call_soon_threadsafe(_resolve, fut, res, err)

    def _warmup(self) -> None:
        def progress(done: int, total: int) -> None:
            self.starting = f"starting: compiling step shapes ({done}/{total} done)"
            self._drain()

        self.starting = "starting: compiling step shapes"
        t0 = time.perf_counter()
        try:
            rep = self.worker.warmup(progress)
        except Exception as e:  # the worker stays up, refusing work, and says why
            log.exception("warm-up failed")
            self.starting = f"{FAILED}: warm-up raised {e!r}"
            return
        self.starting = None
        log.warning("%s worker ready after %.1f s of warm-up%s", self.worker.role, time.perf_counter() - t0,
                    f": {rep}" if rep is not None else " (engine.warmup=false: shapes compile on first use)")

    def _run(self) -> None:
        self._warmup()
        while not self._stop.is_set():
            self._drain()
            try:
                self.worker.tick()
                self.worker.forget_done()
            except Exception:
                log.exception("worker tick failed")
            self._flush()
            if self.worker.idle():
                time.sleep(self._idle_sleep)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _resolve(fut: asyncio.Future, res, err) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(res)
