"""The P/D router: an OpenAI-compatible front that serves each request with one prefill and
one decode worker.

Per request: pick a prefill and a decode worker (round robin or least loaded, among
healthy ones), make a room id, open decode's stream (``/pd/decode``), hand the room to
prefill (``/pd/prefill``), and turn decode's NDJSON lines into events. Any failure on
either side ends the request with an error, never a hang: a worker that refuses gives a
4xx/5xx at once, a worker that dies breaks the stream, and decode's own timeouts cover a
prefill that goes silent. Closing decode's stream (client gone, or prefill refused) makes
decode abort the room, and decode tells prefill. A background task checks every worker's
``/health``; failing workers leave the rotation and come back when they answer again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import random
from typing import Any

import httpx

from serve.openai_app import Overloaded
from serve.prefix_index import PrefixIndex, pick_cache_aware
from toolkit.engine.request import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WorkerState:
    url: str
    role: str
    healthy: bool = False
    control: str = ""
    in_flight: int = 0
    failures: int = 0
    index: PrefixIndex = dataclasses.field(default_factory=PrefixIndex)  # cache_aware: what it likely caches


class RouterBackend:
    def __init__(self, tokenizer, model_name: str, max_model_len: int, prefill_urls: list[str],
                 decode_urls: list[str], policy: str = "round_robin", health_interval_s: float = 1.0,
                 max_queue: int = 256, cache_aware_margin: int = 8, cache_aware_block: int = 16):
        self.tokenizer, self.model_name, self.max_model_len = tokenizer, model_name, max_model_len
        self.workers = {role: [WorkerState(u, role, index=PrefixIndex(cache_aware_block)) for u in urls]
                        for role, urls in (("prefill", prefill_urls), ("decode", decode_urls))}
        self.cache_aware_margin = cache_aware_margin
        self.policy, self.health_interval_s, self.max_queue = policy, health_interval_s, max_queue
        self._rr = {"prefill": itertools.count(), "decode": itertools.count()}
        self._tasks: dict[str, asyncio.Task] = {}
        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None
        self.stats = {"requests": 0, "errors": 0}

    # ---- lifecycle ----------------------------------------------------------------------

    def engine_stats(self):
        return None  # the engines are the workers'; their own /metrics report them

    def starting(self) -> str | None:
        return None  # workers still warming up answer 503 to health checks: out of rotation

    async def startup(self) -> None:
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None), limits=limits)
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop())

    async def shutdown(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        if self._client:
            await self._client.aclose()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    async def check_health(self) -> None:
        async def one(w: WorkerState):
            try:
                r = await self._client.get(w.url + "/health", timeout=2.0)
                ok = r.status_code == 200
                if ok and not w.control:
                    w.control = (await self._client.get(w.url + "/pd/info", timeout=2.0)).json()["control_address"]
            except (httpx.HTTPError, KeyError, ValueError):
                ok = False
            if ok != w.healthy:
                log.warning("%s worker %s is %s", w.role, w.url, "in rotation" if ok else "out of rotation")
                if not ok:
                    w.control = ""  # a restarted worker has a new control address...
                    w.index.clear()  # ...and an empty cache
            w.healthy = ok
        await asyncio.gather(*(one(w) for ws in self.workers.values() for w in ws))

    # ---- picking --------------------------------------------------------------------------

    def pick(self, role: str, ids: list[int] = ()) -> WorkerState:
        live = [w for w in self.workers[role] if w.healthy and w.control]
        if not live:
            raise Overloaded(f"no healthy {role} worker")
        if self.policy == "least_loaded":
            return min(live, key=lambda w: w.in_flight)
        if self.policy == "cache_aware":
            return pick_cache_aware(live, ids, self.cache_aware_margin, next(self._rr[role]))
        return live[next(self._rr[role]) % len(live)]

    # ---- the Backend contract ------------------------------------------------------------

    async def start(self, ids: list[int], params: SamplingParams, rid: str) -> asyncio.Queue:
        if len(self._tasks) >= self.max_queue:
            raise Overloaded(f"router busy: {len(self._tasks)} requests in flight (server.max_queue)")
        pre, dec = self.pick("prefill", ids), self.pick("decode", ids)
        # counted now, not when the task first runs: a burst of requests picked before any
        # task ran all saw the same loads and went to the same workers. Released by the
        # task's done callback, which runs even for a task cancelled before it started.
        held = {"prefill": pre, "decode": dec}
        for w in held.values():
            w.in_flight += 1
        q: asyncio.Queue = asyncio.Queue()
        self.stats["requests"] += 1
        task = asyncio.create_task(self._run(held, ids, params, q))
        task.add_done_callback(lambda _t: self._release(held, rid))
        self._tasks[rid] = task
        return q

    def _release(self, held: dict[str, WorkerState], rid: str) -> None:
        for w in held.values():
            w.in_flight -= 1
        held.clear()
        self._tasks.pop(rid, None)

    async def abort(self, rid: str) -> None:
        t = self._tasks.pop(rid, None)
        if t is not None:
            t.cancel()

    def load(self) -> dict[str, Any]:
        return {"in_flight": len(self._tasks),
                "healthy_prefill": sum(w.healthy for w in self.workers["prefill"]),
                "healthy_decode": sum(w.healthy for w in self.workers["decode"]), **self.stats}

    async def _run(self, held: dict[str, WorkerState], ids, params: SamplingParams, q) -> None:
        """held: the workers this request counts against (prefill leaves it once it accepted)."""
        pre, dec = held["prefill"], held["decode"]
        room = random.getrandbits(62)
        body = {"room": room, "prompt_ids": ids, "params": params.to_dict()}
        try:
            async with self._client.stream("POST", dec.url + "/pd/decode",
                                           json={**body, "prefill_address": pre.control}) as r:
                if r.status_code != 200:
                    await r.aread()
                    return self._fail(q, f"decode worker {dec.url} refused the request: {r.status_code} {r.text}")
                p = await self._client.post(pre.url + "/pd/prefill", json={**body, "decode_address": dec.control})
                if p.status_code != 200:
                    return self._fail(q, f"prefill worker {pre.url} refused the request: {p.status_code} {p.text}")
                pre.in_flight -= 1
                del held["prefill"]
                out: list[int] = []
                async for line in r.aiter_lines():
                    if line:
                        ev = json.loads(line)
                        q.put_nowait(ev)
                        if "token" in ev:
                            out.append(ev["token"])
                            continue
                        if "error" in ev:
                            self.stats["errors"] += 1
                        else:  # what each worker's cache now likely holds
                            pre.index.insert(ids)
                            dec.index.insert(list(ids) + out[:-1])
                        return
                self._fail(q, f"decode worker {dec.url} closed the stream early")
        except httpx.HTTPError as e:
            dec.failures += 1
            self._fail(q, f"lost the decode worker {dec.url}: {type(e).__name__}")

    def _fail(self, q: asyncio.Queue, msg: str) -> None:
        self.stats["errors"] += 1
        q.put_nowait({"error": msg})


def create_router_app(backend: RouterBackend):
    from serve.openai_app import create_openai_app

    return create_openai_app(backend, title=f"jax-pd-toolkit router ({backend.model_name})")
