"""Load generator for any OpenAI-compatible endpoint (ours, or any other server).

    python -m toolkit.bench.serve bench.url=http://127.0.0.1:8000 bench.concurrency=16 bench.num_requests=128
    python -m toolkit.bench.serve bench.workload=multiturn bench.turns=4 bench.json_out=load.json
    python -m toolkit.bench.serve -m bench.concurrency=1,8,32 bench.json_out=load.json   # load-0.json, ...

Workloads are pluggable (``WORKLOADS``): ``random`` (independent random prompts) and
``multiturn`` (conversations that share a system prompt and grow turn by turn: the
shared-prefix traffic a prefix cache is for). Each request streams; we record time to
first token, the gaps between streamed chunks and end-to-end latency, then print a table
(request throughput, output tokens/s, TTFT p50/p99, TPOT, ITL avg/p99, E2E p50) and write JSON.

ITL is the gap between chunks a client sees; a chunk can carry several tokens (servers
send none for a token that decodes to no text yet, such as part of a UTF-8 character), so
TPOT -- (E2E - TTFT) / (output tokens - 1), from the final ``usage`` -- is the per-token
time to set beside an engine's decode step. ``cached_fraction`` is the prompt tokens the
server's prefix caches served (``usage.prompt_tokens_details.cached_tokens``) over all.
Needs only the endpoint: no model config, nothing loaded here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sys
import time
from typing import Callable

import httpx
import numpy as np
from tqdm import tqdm

from toolkit.bench import config, core
from toolkit.cli import hydra_main
from toolkit.config.validate import ConfigError

config.register()
COLS = ["workload", "concurrency", "requests", "failed", "req_per_s", "output_tok_per_s", "ttft_p50_ms",
        "ttft_p99_ms", "tpot_avg_ms", "itl_avg_ms", "itl_p99_ms", "e2e_p50_ms", "cached_fraction"]


WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point government company number group problem fact river stone light music garden window").split()


@dataclasses.dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    itls: list[float] = dataclasses.field(default_factory=list)
    e2e: float = 0.0
    out_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens: the prefix caches' hits
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first (None with fewer than two)."""
        return (self.e2e - self.ttft) / (self.out_tokens - 1) if self.out_tokens > 1 else None


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def random_workload(cfg, rng) -> list[list[dict]]:
    """Each request: one independent conversation of one user message."""
    return [[{"role": "user", "content": _words(rng, cfg.input_len)}] for _ in range(cfg.num_requests)]


def multiturn_workload(cfg, rng) -> list[list[dict]]:
    """Conversations sharing a system prompt; turn t of a conversation repeats turns < t (and
    made-up assistant answers), so consecutive requests share ever longer prefixes."""
    system = {"role": "system", "content": _words(random.Random(cfg.seed), cfg.shared_prefix_len)}
    out, convs = [], max(1, cfg.num_requests // cfg.turns)
    for _ in range(convs):
        msgs = [system]
        for _ in range(cfg.turns):
            msgs = msgs + [{"role": "user", "content": _words(rng, cfg.input_len)}]
            out.append(list(msgs))
            msgs = msgs + [{"role": "assistant", "content": _words(rng, cfg.output_len // 2)}]
    return out[:cfg.num_requests]


def shared_prefix_workload(cfg, rng) -> list[list[dict]]:
    """``num_prefixes`` unique long prefixes (``shared_prefix_len`` words each), each followed
    by many different conversations of ``turns`` turns (``input_len`` words per user turn,
    made-up answers): with a long prefix and a short suffix, ~90% of each prompt is a prefix
    some earlier request already sent (the traffic of a shared document or codebase)."""
    prefixes = [_words(random.Random(cfg.seed + 1 + k), cfg.shared_prefix_len) for k in range(cfg.num_prefixes)]
    out, convs = [], max(1, cfg.num_requests // cfg.turns)
    for c in range(convs):
        msgs = [{"role": "system", "content": prefixes[c % cfg.num_prefixes]}]
        for _ in range(cfg.turns):
            msgs = msgs + [{"role": "user", "content": _words(rng, cfg.input_len)}]
            out.append(list(msgs))
            msgs = msgs + [{"role": "assistant", "content": _words(rng, cfg.output_len // 2)}]
    # interleave conversations turn by turn, so turn t of every conversation comes before turn t+1
    order = sorted(range(len(out)), key=lambda i: (i % cfg.turns, i // cfg.turns))
    return [out[i] for i in order][:cfg.num_requests]


WORKLOADS: dict[str, Callable] = {"random": random_workload, "multiturn": multiturn_workload,
                                  "shared_prefix": shared_prefix_workload}


async def _one(client: httpx.AsyncClient, cfg, model: str, messages: list[dict]) -> Result:
    body = {"model": model, "messages": messages, "max_tokens": cfg.output_len, "temperature": 0,
            "stream": True, "ignore_eos": True}
    if cfg.logprobs:
        body["logprobs"] = True
    t0 = time.perf_counter()
    last, res = None, Result(ok=False)
    try:
        async with client.stream("POST", cfg.url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(False, error=f"{r.status_code}: {r.text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return Result(False, error=ev["error"]["message"])
                ch = ev["choices"][0]
                if ch["delta"].get("content") is not None or ch.get("logprobs"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
                if ev.get("usage"):
                    u = ev["usage"]
                    res.out_tokens, res.prompt_tokens = u["completion_tokens"], u.get("prompt_tokens", 0)
                    res.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        res.ok, res.e2e = True, time.perf_counter() - t0
    except httpx.HTTPError as e:
        res.error = repr(e)
    return res


async def run_load(cfg: config.ServeBench) -> tuple[list[Result], float]:
    """Every request of the workload, at most ``cfg.concurrency`` in flight; (results, wall s)."""
    rng = random.Random(cfg.seed)
    requests = WORKLOADS[cfg.workload](cfg, rng)
    model = served_model(cfg)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=600.0)) as client:
        sem = asyncio.Semaphore(cfg.concurrency)
        bar = tqdm(total=len(requests), desc=f"{cfg.workload} x{cfg.concurrency}", file=sys.stderr)

        async def guarded(msgs):
            async with sem:
                r = await _one(client, cfg, model, msgs)
                bar.update()
                return r

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(m) for m in requests))
        bar.close()
        return list(results), time.perf_counter() - t0


def summarize(results: list[Result], wall: float, cfg: config.ServeBench) -> dict:
    ok = [r for r in results if r.ok]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")  # noqa: E731
    itls = [x for r in ok for x in r.itls]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    return {"workload": cfg.workload, "concurrency": cfg.concurrency, "requests": len(results),
            "failed": len(results) - len(ok), "wall_s": wall, "req_per_s": len(ok) / wall,
            "output_tok_per_s": sum(r.out_tokens for r in ok) / wall,
            "ttft_p50_ms": pct([r.ttft for r in ok], 50), "ttft_p99_ms": pct([r.ttft for r in ok], 99),
            "tpot_avg_ms": float(np.mean(tpots)) * 1e3 if tpots else float("nan"),
            "itl_avg_ms": float(np.mean(itls)) * 1e3 if itls else float("nan"), "itl_p99_ms": pct(itls, 99),
            "e2e_p50_ms": pct([r.e2e for r in ok], 50),
            "cached_fraction": sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok)),
            "errors": sorted({r.error for r in results if not r.ok})[:5]}


def served_model(cfg: config.ServeBench) -> str:
    return cfg.model or httpx.get(cfg.url + "/v1/models", timeout=30).json()["data"][0]["id"]


def job(cfg: config.ServeRun) -> None:
    b = cfg.bench
    if b.workload not in WORKLOADS:
        raise ConfigError(f"bench.workload={b.workload!r}; allowed: {', '.join(WORKLOADS)}")
    results, wall = asyncio.run(run_load(b))
    s = summarize(results, wall, b)
    errors = s.pop("errors")
    card = core.host_card(endpoint=b.url, model=served_model(b))
    core.report("serve", [s], COLS, card=card, config=b, json_out=b.json_out,
                notes=tuple(f"error: {e}" for e in errors), extra={"errors": errors},
                title="Load generator: streamed chat completions against an OpenAI-compatible endpoint")



main = hydra_main(job, config_name="bench/serve")

if __name__ == "__main__":
    main()
