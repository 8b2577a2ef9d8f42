"""HTTP front of a P/D worker (role=prefill or role=decode).

    POST /pd/prefill  {room, prompt_ids, params, decode_address}   -> 200 accepted | 4xx
    POST /pd/decode   {room, prompt_ids, params, prefill_address}  -> NDJSON stream of
                      {"token", "text", "logprob"} lines, then {"finish_reason"} or {"error"}
    GET  /pd/info     role and control address (what the router hands the other side)
    GET  /pd/stats    pages, aux slots, rooms, transfer counters
    GET  /health
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from serve.loop import EngineLoop, health_status
from serve.metrics import Metrics
from toolkit.disagg.protocol import RoomState
from toolkit.engine.request import SamplingParams


class PDRequest(BaseModel):
    room: int = Field(ge=0, lt=2**63)
    prompt_ids: list[int] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    decode_address: str = ""
    prefill_address: str = ""


def _params(d: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams.from_dict(d)
    except (TypeError, ValueError) as e:
        raise HTTPException(400, f"params: {e}")


def _status_for(e: Exception) -> int:
    return 409 if "already in use" in str(e) else 400


def create_app(worker) -> FastAPI:
    loop = EngineLoop(worker)
    app = FastAPI(title=f"jax-pd-toolkit {worker.role} worker")
    app.state.loop = loop

    @app.on_event("startup")
    async def _start():
        loop.start()

    @app.on_event("shutdown")
    async def _stop():
        loop.stop()
        worker.close()

    @app.get("/health")
    async def health():
        if (why := loop.starting) is not None:
            return JSONResponse({"status": health_status(why), "reason": why, "role": worker.role},
                                status_code=503)
        return {"status": "ok", "role": worker.role}

    def refuse_while_starting():
        if (why := loop.starting) is not None:
            raise HTTPException(503, why, headers={"Retry-After": "5"})

    @app.get("/pd/info")
    async def info():
        return {"role": worker.role, "control_address": worker.control.address}

    metrics = app.state.metrics = Metrics()

    def snapshot():
        """(EngineStats, the /pd/stats record), read together on the loop thread."""
        e = worker.engine.stats()
        return e, {"pages_used": e.pages_used, "pages_usable": e.pages_usable, "aux_free": worker.aux.num_free,
                   "state_slots": e.state_slots, "state_slots_free": e.state_slots_free,
                   "aux_slots": worker.tcfg.max_rooms, "rooms_active": len(worker.active_rooms()),
                   "idle": worker.idle(), "mem_type": getattr(getattr(worker.backend, "spec", None),
                                                              "mem_type", "?"), **worker.stats}

    @app.get("/metrics")
    async def metrics_endpoint():
        e, st = await loop.call(snapshot)
        metrics.set_engine(e)
        metrics.running.set(st["rooms_active"])
        metrics.transfer_bytes.set(st["transfer_bytes"])
        metrics.transfer_failures.set(st["transfer_failures"])
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/pd/stats")
    async def stats():
        return (await loop.call(snapshot))[1]

    if worker.role == "prefill":
        @app.post("/pd/prefill")
        async def prefill(req: PDRequest):
            refuse_while_starting()
            params = _params(req.params)
            try:
                await loop.call(lambda: worker.submit(req.room, req.prompt_ids, params, req.decode_address))
            except ValueError as e:
                raise HTTPException(_status_for(e), str(e))
            return {"room": req.room, "accepted": True}

    if worker.role == "decode":
        @app.post("/pd/decode")
        async def decode(req: PDRequest, request: Request):
            refuse_while_starting()
            params = _params(req.params)
            aloop, q = asyncio.get_running_loop(), asyncio.Queue()

            def on_token(seq, tok, delta):
                lp = seq.output_logprobs[-1] if seq.output_logprobs else None
                loop.emit(aloop, q, {"token": tok, "text": delta, "logprob": lp})

            def on_done(room):
                if room.state is RoomState.FAILED:
                    loop.emit(aloop, q, {"error": room.error})
                else:
                    loop.emit(aloop, q, {"finish_reason": room.seq.finish_reason,
                                         "cached_tokens": room.seq.num_cached})

            try:
                await loop.call(lambda: worker.submit(req.room, req.prompt_ids, params, req.prefill_address,
                                                      on_token=on_token, on_done=on_done))
            except ValueError as e:
                raise HTTPException(_status_for(e), str(e))

            async def events():
                try:
                    while True:
                        item = await q.get()
                        yield json.dumps(item) + "\n"
                        if "error" in item or "finish_reason" in item:
                            return
                finally:  # client went away (or we are done): stop the room if it still runs
                    loop.call_soon(lambda: worker.abort(req.room, "client disconnected"))

            return StreamingResponse(events(), media_type="application/x-ndjson")

    return app
