"""Real worker processes for tests: start ``python -m serve`` on loopback, drive it over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from toolkit.disagg.control import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_ENGINE = ["model=tiny-random", "engine.page_size=4", "engine.chunk_size=16", "engine.num_pages=256",
               "engine.max_batch_size=16", "engine.max_prefill_seqs=4", "engine.max_model_len=512",
               "engine.min_bucket=4", "engine.attention_backend=reference"]


class Worker:
    def __init__(self, role: str, overrides: list[str] = (), startup_s: float = 120, env: dict | None = None,
                 engine: list[str] = TINY_ENGINE):
        """engine: the model and engine overrides (default: the tiny random model's)."""
        self.role, self.port = role, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                      TOOLKIT_LOG=os.environ.get("PD_TEST_LOG", "WARNING")), **(env or {})}
        self.log = open(os.path.join("/tmp", f"pd-{role}-{self.port}.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", f"role={role}", f"transfer={'nixl' if role in ('prefill', 'decode') else 'none'}",
             f"server.port={self.port}",
             *engine, *overrides], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while True:
            assert self.proc.poll() is None, f"{role} worker exited: {open(self.log.name).read()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() - t0 < startup_s, f"{role} worker did not start"
            time.sleep(0.3)
        if role in ("prefill", "decode"):
            self.control = httpx.get(self.url + "/pd/info").json()["control_address"]

    def stats(self) -> dict:
        return httpx.get(self.url + "/pd/stats", timeout=10).json()

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of its /metrics page."""
        from serve.metrics import unlabelled_samples

        return unlabelled_samples(httpx.get(self.url + "/metrics", timeout=10).text)

    def wait_idle(self, timeout: float = 30) -> dict:
        t0 = time.time()
        while True:
            s = self.stats()
            if (s["idle"] and s["pages_used"] == 0 and s["aux_free"] == s["aux_slots"]
                    and s["state_slots_free"] == s["state_slots"]):
                return s
            assert time.time() - t0 < timeout, f"{self.role} not idle: {s}"
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def pd_request(prefill: Worker, decode: Worker, room: int, prompt: list[int], params: dict,
               timeout: float = 120) -> dict:
    """Act as the router: send the room to both sides, collect decode's stream.
    Returns {"tokens": [...], "finish_reason": ...} or {"error": ...}."""
    body = {"room": room, "prompt_ids": prompt, "params": params}
    with httpx.Client(timeout=timeout) as c:
        with c.stream("POST", decode.url + "/pd/decode", json={**body, "prefill_address": prefill.control}) as r:
            if r.status_code != 200:
                r.read()
                return {"error": f"decode {r.status_code}: {r.text}"}
            p = c.post(prefill.url + "/pd/prefill", json={**body, "decode_address": decode.control})
            if p.status_code != 200:
                return {"error": f"prefill {p.status_code}: {p.text}"}
            tokens = []
            for line in r.iter_lines():
                item = json.loads(line)
                if "token" in item:
                    tokens.append(item["token"])
                elif "error" in item:
                    return {"error": item["error"], "tokens": tokens}
                else:
                    return {"tokens": tokens, "finish_reason": item["finish_reason"]}
    return {"error": "stream ended without a final line", "tokens": tokens}


def run_concurrently(prefill, decode, prompts, params_list, room_base=1000) -> list[dict]:
    with ThreadPoolExecutor(len(prompts)) as ex:
        futs = [ex.submit(pd_request, prefill, decode, room_base + i, p, sp)
                for i, (p, sp) in enumerate(zip(prompts, params_list))]
        return [f.result() for f in futs]


def stream_then_disconnect(url: str, max_tokens: int, lines: int) -> None:
    """Start a long streaming completion, read a few SSE lines, then hang up."""
    with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
            "model": "tiny-random", "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= lines:
                break
