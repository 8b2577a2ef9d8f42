"""Server start-up with engine.warmup=true, as real ``python -m serve`` processes on loopback:
/health says 503 "starting" until every step shape is compiled, serving afterwards compiles
nothing, and a restarted server loads its step from the persistent compile cache
(engine.compile_cache_dir) instead of compiling it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serve.metrics import unlabelled_samples
from tests.disagg.procs import ROOT, free_port

pytestmark = pytest.mark.timeout(300)

# Tiny compact set: decode B=8 greedy and sampling; prefill T in {8, 16} with B=2; W=32: 4 shapes.
STEP_SHAPES = 4
ENGINE = ["model=tiny-random", "engine.page_size=4", "engine.num_pages=64", "engine.max_batch_size=8",
          "engine.chunk_size=16", "engine.max_prefill_seqs=2", "engine.max_model_len=128", "engine.min_bucket=8",
          "engine.attention_backend=reference", "engine.shape_buckets=compact", "engine.warmup=true"]
LATE_COMPILE = "compiling a step shape after warm-up"  # serve's warning for a shape outside the set


def metrics(url: str) -> dict[str, float]:
    """The unlabelled samples of /metrics."""
    return unlabelled_samples(httpx.get(url + "/metrics", timeout=30).text)


class Server:
    """One ``python -m serve`` process; ``watch_startup`` polls it until /health is 200,
    recording every answer on the way."""

    def __init__(self, role: str, overrides: list[str], log_dir):
        self.role, self.port = role, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        transfer = "nixl" if role in ("prefill", "decode") else "none"
        self.log_path = os.path.join(str(log_dir), f"{role}-{self.port}.log")
        self._log = open(self.log_path, "w")
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TOOLKIT_LOG="WARNING")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", f"role={role}", f"transfer={transfer}", f"server.port={self.port}",
             *ENGINE, *overrides], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def watch_startup(self, probe=None, timeout: float = 180) -> dict:
        """Poll /health (and /metrics after each answer) until 200. ``probe(url)``, if given,
        runs after each of the first few 503s (a request that must be refused while starting).
        Returns {"answers": [(status, body, metrics)], "probes": [...], "ready": metrics at 200}."""
        answers, probes, t0 = [], [], time.time()
        while True:
            assert self.proc.poll() is None, f"{self.role} server exited:\n{self.log()[-3000:]}"
            assert time.time() - t0 < timeout, f"{self.role} server not ready in {timeout} s:\n{self.log()[-3000:]}"
            try:
                r = httpx.get(self.url + "/health", timeout=30)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.05)
                continue
            m = metrics(self.url)
            answers.append((r.status_code, r.json(), m))
            if r.status_code == 200:
                return {"answers": answers, "probes": probes, "ready": m, "seconds": time.time() - t0}
            if probe is not None and len(probes) < 3:
                probes.append(probe(self.url))
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Start servers; every one still running is stopped when the module is done."""
    made, logs = [], tmp_path_factory.mktemp("server-logs")

    def start(role: str, overrides: list[str]) -> Server:
        s = Server(role, overrides, logs)
        made.append(s)
        return s

    yield start
    for s in made:
        s.stop()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """An empty compile cache: the first server compiles everything (cold)."""
    return str(tmp_path_factory.mktemp("xla-cache"))


def assert_metrics_while_starting(answers) -> None:
    """/metrics answers while /health is 503 (for a P/D worker it is a call on the loop
    thread, answered between shapes) and says not warmed up, with the set's size. /metrics
    is read just after /health, so the one after the last 503 may already say warmed up."""
    starting = [m for code, _, m in answers if code != 200]
    assert all(m["step_shapes"] == STEP_SHAPES for m in starting), starting
    assert all(m["warmed_up"] == 0 for m in starting[:-1]), starting
    assert starting[0]["warmed_up"] == 0, starting


def completion_probe(url: str) -> tuple[int, dict, str | None]:
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "tiny-random", "prompt": "probe", "max_tokens": 2, "temperature": 0, "ignore_eos": True})
    return r.status_code, r.json(), r.headers.get("retry-after")


def _sse_text(url: str, path: str, body: dict) -> str:
    parts = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])["choices"][0]
            parts.append(c["text"] if "text" in c else (c["delta"].get("content") or ""))
    return "".join(parts)


def _post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def exercise(url: str) -> dict[str, str]:
    """A few requests of every kind: completions streamed and not, greedy and seeded
    sampling, a prompt longer than chunk_size (chunked prefill), chat, and 8 at once (full
    decode batches). Returns each request's text by name."""
    out = {}
    greedy = {"model": "tiny-random", "prompt": "Hello there", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    r = _post(url, "/v1/completions", {**greedy, "logprobs": 1})
    assert r["usage"]["completion_tokens"] == 12 and len(r["choices"][0]["logprobs"]["token_logprobs"]) == 12
    out["greedy"], out["greedy_stream"] = r["choices"][0]["text"], _sse_text(url, "/v1/completions", greedy)
    sampled = {"model": "tiny-random", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0.9,
               "top_k": 50, "seed": 5, "ignore_eos": True}
    out["sampled"] = _post(url, "/v1/completions", sampled)["choices"][0]["text"]
    out["sampled_stream"] = _sse_text(url, "/v1/completions", sampled)
    long = {"model": "tiny-random", "prompt": "0123456789" * 5, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    out["long"] = _post(url, "/v1/completions", long)["choices"][0]["text"]
    chat = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "temperature": 0, "seed": 1}
    out["chat"] = _post(url, "/v1/chat/completions", chat)["choices"][0]["message"]["content"]
    out["chat_stream"] = _sse_text(url, "/v1/chat/completions", chat)
    results, lock = {}, threading.Lock()

    def one(i: int) -> None:
        body = {"model": "tiny-random", "prompt": f"request {i} " * (1 + i % 3), "max_tokens": 6 + i,
                "temperature": 0.7 if i % 2 else 0.0, "seed": i, "ignore_eos": True}
        text = _post(url, "/v1/completions", body)["choices"][0]["text"]
        with lock:
            results[f"batch{i}-" + ("sampled" if i % 2 else "greedy")] = text

    ts = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(results) == 8
    out.update(results)
    return out


def wait_free(url: str, timeout: float = 30) -> None:
    t0 = time.time()
    while (h := httpx.get(url + "/health", timeout=10).json())["pages_in_use"] or h["in_flight"]:
        assert time.time() - t0 < timeout, h
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cold(servers, cache_dir):
    """The first server on an empty compile cache: its start-up record, then the metrics
    right after ready, the outputs of ``exercise`` and the metrics after it. Stopped at the
    end (the restart test needs the cache it filled, written by a finished process)."""
    s = servers("unified", [f"engine.compile_cache_dir={cache_dir}"])
    rec = s.watch_startup(probe=completion_probe)
    rec["after_ready"] = metrics(s.url)
    rec["outputs"] = exercise(s.url)
    wait_free(s.url)
    rec["after_load"] = metrics(s.url)
    s.stop()
    rec["log"] = s.log()
    return rec


def test_health_is_503_starting_until_warmed_up(cold):
    """Guards against a server reporting ready (/health 200) before every step shape is
    compiled (a router would send it requests that stall on compilations), a non-200 /health
    that is not a 503 with a reason, /metrics not answering during warm-up, and requests
    being accepted while it warms up."""
    answers = cold["answers"]
    not_ok = [(code, body) for code, body, _ in answers if code != 200]
    # an empty cache: compiling 4 shapes takes seconds, so the 503 phase is always seen
    assert not_ok, "never saw /health 503 during a cold warm-up"
    for code, body in not_ok:
        assert code == 503 and body["status"] == "starting" and body["reason"].startswith("starting"), body
    assert_metrics_while_starting(answers)
    progress = [b["reason"] for _, b, _ in answers[:-1] if "done)" in b["reason"]]
    assert all(r.endswith(f"/{STEP_SHAPES} done)") for r in progress), progress
    # the first 200 comes after warm-up: /metrics read right after it says warmed up, all compiled
    code, body, ready = answers[-1]
    assert code == 200 and body["status"] == "ok"
    assert ready["warmed_up"] == 1 and ready["step_compilations"] == ready["step_shapes"] == STEP_SHAPES, ready
    assert ready["xla_compilations"] >= STEP_SHAPES and ready["xla_cache_loads"] == 0, ready
    # a completion while starting: 503 with Retry-After (200 only if it became ready in between)
    assert cold["probes"]
    for code, body, retry in cold["probes"]:
        assert code in (503, 200), body
        if code == 503:
            assert retry and body["error"]["message"].startswith("starting"), body
    assert "unified worker ready after" in cold["log"] and "4 compiled, 0 loaded" in cold["log"]


def test_serving_after_warmup_compiles_nothing(cold):
    """Guards against a request shape the warm-up missed (streamed or not, sampled or greedy,
    chunked prefill, a full batch, chat): each would compile while serving, stalling every
    request of the worker."""
    before, after = cold["after_ready"], cold["after_load"]
    assert after["step_compilations"] == before["step_compilations"] == STEP_SHAPES, (before, after)
    # no XLA compilation at all while serving, not only the step's
    assert after["xla_compilations"] == before["xla_compilations"], (before, after)
    assert after["kv_pages_in_use"] == 0
    assert LATE_COMPILE not in cold["log"]
    out = cold["outputs"]
    assert out["greedy"] == out["greedy_stream"] and out["sampled"] == out["sampled_stream"]
    assert out["chat"] == out["chat_stream"]


def test_restart_loads_the_step_from_the_compile_cache(cold, servers, cache_dir):
    """Guards against the compile cache directory not being used by a restarted worker (it
    would compile everything again: minutes on a GPU; or trace and lower every shape again to
    look it up: a second or more each), and against executables loaded from it computing
    something else than freshly compiled ones."""
    s = servers("unified", [f"engine.compile_cache_dir={cache_dir}"])
    rec = s.watch_startup()
    for code, body, _ in rec["answers"][:-1]:
        assert code == 503 and body["status"] == "starting" and body["reason"], body
    ready = rec["ready"]
    assert ready["warmed_up"] == 1 and ready["step_compilations"] == ready["step_shapes"] == STEP_SHAPES, ready
    # everything this process ran was loaded: the step's 4 shapes from the step store (not
    # traced), the 2 small jits the KV pool's allocation compiles (convert_element_type,
    # broadcast_in_dim) from JAX's cache
    assert ready["xla_compilations"] == 0, ready
    assert ready["step_executables_loaded"] == STEP_SHAPES, ready
    assert ready["xla_cache_loads"] == cold["after_ready"]["xla_compilations"] - STEP_SHAPES, \
        (ready, cold["after_ready"])
    out = exercise(s.url)
    # the sequential requests ran alone (the same steps on both servers): equal token for token;
    # of the concurrent ones, how they batch depends on timing, so only greedy ones compare
    same = [k for k in out if not k.endswith("-sampled")]
    assert len(same) == 11
    assert {k: out[k] for k in same} == {k: cold["outputs"][k] for k in same}, \
        "a cache-loaded step gave other tokens than the compiled one"
    wait_free(s.url)
    after = metrics(s.url)
    assert after["step_compilations"] == STEP_SHAPES and after["xla_compilations"] == 0, after
    s.stop()
    log = s.log()
    assert "4 loaded from the step store; 0 compiled" in log and LATE_COMPILE not in log


def decode_probe(url: str) -> tuple[int, dict, str | None]:
    """A /pd/decode whose params are invalid: 503 while starting (refused before anything
    else), 400 once ready (nothing is admitted either way, so no room waits for a prefill)."""
    r = httpx.post(url + "/pd/decode", timeout=60,
                   json={"room": 1, "prompt_ids": [1, 2, 3], "params": {"temperature": -1}})
    return r.status_code, r.json(), r.headers.get("retry-after")


def test_decode_worker_warms_up_before_ready(servers, tmp_path_factory):
    """Guards against a P/D decode worker accepting rooms while it compiles (/pd/decode must
    answer 503 until warm-up is done), its /metrics hanging during warm-up (it is served by
    the loop thread, which must answer calls between shapes), or it never becoming ready."""
    s = servers("decode", [f"engine.compile_cache_dir={tmp_path_factory.mktemp('xla-decode')}"])
    rec = s.watch_startup(probe=decode_probe)
    not_ok = [body for code, body, _ in rec["answers"] if code != 200]
    assert not_ok, "never saw /health 503 during a cold warm-up"
    for code, body, m in rec["answers"][:-1]:
        assert code == 503 and body["status"] == "starting" and body["reason"] and body["role"] == "decode", body
    assert_metrics_while_starting(rec["answers"])
    assert rec["probes"]
    for code, body, retry in rec["probes"]:
        assert code in (503, 400), body
        if code == 503:
            assert retry and body["detail"].startswith("starting"), body
    assert any(code == 503 for code, _, _ in rec["probes"]), rec["probes"]
    ready = rec["ready"]
    assert ready["warmed_up"] == 1 and ready["step_compilations"] == STEP_SHAPES, ready
    code, body, _ = decode_probe(s.url)  # ready: the request reaches validation
    assert code == 400 and "temperature" in body["detail"], body
    st = httpx.get(s.url + "/pd/stats", timeout=10).json()
    assert st["idle"] and st["pages_used"] == 0 and st["rooms_active"] == 0, st
    assert metrics(s.url)["step_compilations"] == STEP_SHAPES
