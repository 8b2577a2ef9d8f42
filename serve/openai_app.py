"""The OpenAI-compatible HTTP layer, shared by the unified worker and the P/D router.

A ``Backend`` turns (prompt ids, sampling params) into a queue of events:
``{"token", "text", "logprob"}`` per token, then ``{"finish_reason"}`` or ``{"error"}``.
This module only speaks HTTP: validation (4xx naming the field), admission (503 +
Retry-After when the queue is full), SSE streaming, usage, logprobs, metrics, and
aborting a request whose client went away.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve.loop import health_status
from serve.metrics import Metrics
from serve.schemas import ChatRequest, CompletionRequest
from toolkit.engine.request import SamplingParams


class Overloaded(Exception):
    pass


class Backend(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Any

    async def start(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> asyncio.Queue: ...

    async def abort(self, request_id: str) -> None: ...

    def load(self) -> dict[str, int]: ...

    def engine_stats(self):
        """The ``EngineStats`` of the engine behind this front, or None (the router has none)."""

    def starting(self) -> str | None:
        """Why this front cannot serve yet (warm-up in progress, or failed), or None: ready."""

    async def startup(self) -> None:
        """Called once when the server starts (start the engine loop, open clients)."""

    async def shutdown(self) -> None:
        """Called once when the server stops."""


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


def create_openai_app(backend: Backend, metrics: Metrics | None = None, title: str = "jax-pd-toolkit") -> FastAPI:
    app = FastAPI(title=title)
    m = app.state.metrics = metrics or Metrics()
    app.state.backend = backend

    @app.on_event("startup")
    async def _start():
        await backend.startup()

    @app.on_event("shutdown")
    async def _stop():
        await backend.shutdown()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        field = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        msg = f"{field}: {first.get('msg', 'invalid')}" if field else first.get("msg", "invalid request body")
        m.requests.labels(request.url.path, "400").inc()
        return error(400, msg, field)

    @app.get("/health")
    async def health():
        if (why := backend.starting()) is not None:
            return JSONResponse({"status": health_status(why), "reason": why}, status_code=503)
        return {"status": "ok", **backend.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": backend.model_name, "object": "model",
                                            "created": 0, "owned_by": "jax-pd-toolkit"}]}

    @app.get("/metrics")
    async def metrics_endpoint():
        load = backend.load()
        m.queue.set(load.get("waiting", 0))
        m.running.set(load.get("running", 0))
        if (st := backend.engine_stats()) is not None:
            m.set_engine(st)  # pages, compilations
        else:
            m.pages.set(load.get("pages_in_use", 0))
        m.transfer_bytes.set(load.get("transfer_bytes", 0))
        m.transfer_failures.set(load.get("transfer_failures", 0))
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        ids = req.prompt if isinstance(req.prompt, list) else backend.tokenizer.encode(req.prompt)
        return await _serve(request, req, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        msgs = [{"role": "system" if x.role == "developer" else x.role, "content": x.content}
                for x in req.messages]
        text = backend.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        return await _serve(request, req, backend.tokenizer.encode(text), chat=True)

    async def _serve(request: Request, req, ids: list[int], chat: bool):
        path = request.url.path
        if req.model != backend.model_name:
            m.requests.labels(path, "404").inc()
            return error(404, f"model: unknown model {req.model!r}; this server serves "
                              f"{backend.model_name!r}", "model")
        try:
            params = _params(req, ids, backend.max_model_len, chat)
        except ValueError as e:
            m.requests.labels(path, "400").inc()
            return error(400, str(e), str(e).split(":")[0])
        if (why := backend.starting()) is not None:
            m.requests.labels(path, "503").inc()
            return error(503, why, headers={"Retry-After": "5"})
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            q = await backend.start(ids, params, rid)
        except Overloaded as e:
            m.requests.labels(path, "503").inc()
            return error(503, str(e), headers={"Retry-After": "1"})
        except ValueError as e:
            m.requests.labels(path, "400").inc()
            return error(400, str(e))
        m.requests.labels(path, "200").inc()
        events = _timed(q, m, time.perf_counter())
        want_lp = bool(req.logprobs) if chat else req.logprobs is not None
        if req.stream:
            gen = _sse(events, rid, backend.model_name, chat, len(ids), want_lp, backend)
            return StreamingResponse(_guard(gen, request, backend, rid), media_type="text/event-stream")
        try:
            return await _collect(events, rid, backend.model_name, chat, len(ids), want_lp, backend)
        except asyncio.CancelledError:
            await backend.abort(rid)
            raise

    return app


def _params(req, ids: list[int], max_model_len: int, chat: bool) -> SamplingParams:
    if not ids:
        raise ValueError("prompt: the prompt is empty")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt: {len(ids)} tokens; the context holds {max_model_len}")
    max_tokens = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
    max_tokens = max_tokens if max_tokens is not None else (max_model_len - len(ids) if chat else 16)
    if len(ids) + max_tokens > max_model_len:
        raise ValueError(f"max_tokens: {max_tokens} + {len(ids)} prompt tokens exceed the context "
                         f"of {max_model_len}")
    return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=req.top_k, seed=req.seed, stop=req.stop_list(), ignore_eos=req.ignore_eos)


async def _timed(q: asyncio.Queue, m: Metrics, t0: float) -> AsyncIterator[dict]:
    last = None
    while True:
        ev = await q.get()
        if "token" in ev:
            now = time.perf_counter()
            (m.ttft.observe(now - t0) if last is None else m.itl.observe(now - last))
            last = now
        yield ev
        if "token" not in ev:
            return


def _usage(n_prompt: int, n_out: int, cached: int = 0) -> dict:
    """OpenAI's usage, with the prompt tokens found in the prefix cache where OpenAI puts them."""
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _logprobs_obj(tokens: list[tuple[int, str, float]], tokenizer, chat: bool) -> dict:
    if chat:
        return {"content": [{"token": tokenizer.decode([t], skip_special_tokens=False), "logprob": lp,
                             "bytes": None, "top_logprobs": []} for t, _, lp in tokens]}
    offs, o = [], 0
    for _, text, _ in tokens:
        offs.append(o)
        o += len(text)
    return {"tokens": [tokenizer.decode([t], skip_special_tokens=False) for t, _, _ in tokens],
            "token_logprobs": [lp for _, _, lp in tokens], "top_logprobs": None, "text_offset": offs}


async def _collect(events, rid, model, chat, n_prompt, want_lp, backend):
    toks, text, finish, cached = [], [], None, 0
    async for ev in events:
        if "token" in ev:
            toks.append((ev["token"], ev["text"], ev["logprob"]))
            text.append(ev["text"])
        elif "error" in ev:
            return error(500, f"generation failed: {ev['error']}")
        else:
            finish, cached = ev["finish_reason"], ev.get("cached_tokens", 0)
    finish = "stop" if finish == "stop" else "length"
    lp = _logprobs_obj(toks, backend.tokenizer, chat) if want_lp else None
    content = "".join(text)
    choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": lp,
               "finish_reason": finish} if chat else
              {"index": 0, "text": content, "logprobs": lp, "finish_reason": finish})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage(n_prompt, len(toks), cached)}


async def _sse(events, rid, model, chat, n_prompt, want_lp, backend) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    created, n = int(time.time()), 0

    def chunk(delta_text: str | None, finish: str | None, lp=None, role: bool = False, cached: int = 0) -> str:
        if chat:
            delta = {"role": "assistant"} if role else ({"content": delta_text} if delta_text is not None else {})
            c = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            c = {"index": 0, "text": delta_text or "", "logprobs": lp, "finish_reason": finish}
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [c]}
        if finish is not None:
            body["usage"] = _usage(n_prompt, n, cached)
        return f"data: {json.dumps(body)}\n\n"

    if chat:
        yield chunk(None, None, role=True)
    async for ev in events:
        if "token" in ev:
            n += 1
            lp = _logprobs_obj([(ev["token"], ev["text"], ev["logprob"])], backend.tokenizer, chat) if want_lp else None
            if ev["text"] or want_lp:
                yield chunk(ev["text"], None, lp)
        elif "error" in ev:
            yield f"data: {json.dumps({'error': {'message': 'generation failed: ' + ev['error'], 'type': 'server_error', 'code': 500}})}\n\n"
            return
        else:
            yield chunk(None if chat else "", "stop" if ev["finish_reason"] == "stop" else "length",
                        cached=ev.get("cached_tokens", 0))
    yield "data: [DONE]\n\n"


async def _guard(gen: AsyncIterator[str], request: Request, backend, rid: str) -> AsyncIterator[str]:
    """Stream, and abort the request on every worker if the client goes away mid-stream."""
    finished = False
    try:
        async for item in gen:
            yield item
        finished = True
    finally:
        if not finished:
            await backend.abort(rid)
