"""The unified worker behind the OpenAI API: one engine, stepped by the loop thread."""

from __future__ import annotations

import asyncio

from serve.loop import EngineLoop
from serve.openai_app import Overloaded
from toolkit.engine.engine import Engine
from toolkit.engine.request import SamplingParams


class UnifiedWorker:
    role = "unified"

    def __init__(self, engine: Engine):
        self.engine = engine
        self.emitters: dict = {}  # request id -> emit(event)

    def tick(self) -> None:
        if self.engine.has_unfinished():
            for seq in self.engine.step():
                if seq.is_finished:
                    self.end(seq)
        else:
            self.engine.poll_copies()  # tier copies end (and unpin their pages) while idle too

    def end(self, seq) -> None:
        emit = self.emitters.pop(seq.request_id, None)
        if emit is not None:
            emit({"finish_reason": seq.finish_reason, "cached_tokens": seq.num_cached})

    def idle(self) -> bool:
        return not self.engine.has_unfinished()

    def warmup(self, on_progress):
        return self.engine.warmup(on_progress=on_progress)

    def forget_done(self) -> None:
        pass

    def close(self) -> None:
        pass


class UnifiedBackend:
    def __init__(self, engine: Engine, model_name: str, max_queue: int):
        self.engine, self.model_name, self.max_queue = engine, model_name, max_queue
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.worker = UnifiedWorker(engine)
        self._admitting = 0  # admitted, not yet registered by the loop thread
        self.loop = EngineLoop(self.worker)

    async def start(self, ids: list[int], params: SamplingParams, rid: str) -> asyncio.Queue:
        # Requests between this check and their registration on the loop thread count too:
        # checking only the registered ones let a burst past the bound.
        in_flight = len(self.worker.emitters) + self._admitting
        if in_flight >= self.max_queue:
            raise Overloaded(f"server busy: {in_flight} requests in flight "
                             f"(server.max_queue={self.max_queue}); retry later")
        aloop, q = asyncio.get_running_loop(), asyncio.Queue()

        def emit(ev):
            self.loop.emit(aloop, q, ev)

        def on_token(seq, tok, delta):
            emit({"token": tok, "text": delta, "logprob": seq.output_logprobs[-1]})

        def submit():
            self.engine.add_request(ids, params, request_id=rid, on_token=on_token)
            self.worker.emitters[rid] = emit

        self._admitting += 1
        try:
            await self.loop.call(submit)
        finally:
            self._admitting -= 1
        return q

    async def abort(self, rid: str) -> None:
        def stop():
            seq = self.engine.abort(rid)
            if seq is not None:
                self.worker.end(seq)
        await self.loop.call(stop)

    async def startup(self) -> None:
        self.loop.start()

    async def shutdown(self) -> None:
        self.loop.stop()
        self.engine.close()  # tier copies in flight end; the storage index is on disk

    def engine_stats(self):
        return self.engine.stats()

    def starting(self) -> str | None:
        return self.loop.starting

    def load(self) -> dict[str, int]:
        s = self.engine.stats()
        return {"waiting": s.waiting, "running": s.running, "pages_in_use": s.pages_used,
                "in_flight": len(self.worker.emitters)}


def create_unified_app(engine: Engine, model_name: str, max_queue: int = 256):
    from serve.openai_app import create_openai_app

    return create_openai_app(UnifiedBackend(engine, model_name, max_queue),
                             title=f"jax-pd-toolkit unified ({model_name})")
