"""P/D across two OS processes over real NIXL (UCX, loopback), driven over HTTP."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from tests.disagg.conftest import edge_params, edge_prompts, unified_reference
from tests.disagg.procs import Worker, pd_request, run_concurrently

pytestmark = pytest.mark.timeout(600)


def as_dict(p):
    return {k: v for k, v in dataclasses.asdict(p).items() if k in ("max_new_tokens", "ignore_eos", "temperature")}


@pytest.fixture
def workers():
    made = []

    def start(role, overrides=()):
        w = Worker(role, list(overrides))
        made.append(w)
        return w

    yield start
    for w in made:
        w.stop()


def test_two_processes_equal_unified_and_free_everything(tiny_ckpt, workers):
    """Guards against anything that only breaks across processes: addresses registered in one
    process used in another, metadata serialisation, notification delivery, and pages leaked on
    either side (16 concurrent requests with the protocol's edge cases)."""
    prompts, params = edge_prompts(16, seed=11), edge_params(16)
    ref = unified_reference(tiny_ckpt, prompts, params)
    pre, dec = workers("prefill"), workers("decode")
    got = run_concurrently(pre, dec, prompts, [as_dict(p) for p in params])
    assert [g.get("tokens") if "error" not in g else g["error"] for g in got] == ref
    pre.wait_idle(), dec.wait_idle()
    assert pre.stats()["rooms_ok"] == 16


def test_fault_injection_across_processes(tiny_ckpt, workers):
    """Guards against failed transfers hanging clients, breaking unaffected requests, or leaking
    pages in either process; both workers keep serving afterwards."""
    prompts, params = edge_prompts(16, seed=12), edge_params(16)
    ref = unified_reference(tiny_ckpt, prompts, params)
    pre = workers("prefill", ["transfer.fault_rate=0.3", "transfer.fault_seed=3"])
    dec = workers("decode", ["transfer.quarantine_s=1"])
    got = run_concurrently(pre, dec, prompts, [as_dict(p) for p in params])
    errors = [g for g in got if "error" in g]
    assert 0 < len(errors) < 16 and all("injected transfer fault" in g["error"] for g in errors)
    for g, want in zip(got, ref):
        if "error" not in g:
            assert g["tokens"] == want
    pre.wait_idle(), dec.wait_idle()


def test_killing_prefill_fails_its_rooms_then_decode_serves_another_prefill(tiny_ckpt, workers):
    """Guards against decode hanging on (or leaking the pages of) rooms whose prefill died
    mid-transfer, and against a dead peer poisoning the decode worker for later requests."""
    wait_s = 15.0  # covers a fresh prefill connecting and compiling its first steps
    # a slow prefill: tiny chunks, so a long prompt takes many steps and many transfers
    pre = workers("prefill", ["engine.chunk_size=4", "engine.max_prefill_seqs=1"])
    dec = workers("decode", [f"transfer.wait_timeout_s={wait_s}", "transfer.quarantine_s=1"])
    long_prompt = edge_prompts(16, seed=13)[2] * 6  # ~300 tokens: ~75 chunks
    results = {}

    def run(i):
        results[i] = pd_request(pre, dec, 5000 + i, long_prompt, {"max_new_tokens": 4})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    t0 = time.time()
    while pre.stats()["transfer_bytes"] == 0:  # wait until transfers are under way
        assert time.time() - t0 < 60
        time.sleep(0.05)
    pre.kill()
    killed_at = time.time()
    for t in threads:
        t.join(60)
    assert all("error" in r for r in results.values()), results
    assert time.time() - killed_at < wait_s + 5, "decode took longer than its timeout to fail the rooms"
    dec.wait_idle()
    pre2 = workers("prefill")
    prompts, params = edge_prompts(4, seed=14), edge_params(4)
    ref = unified_reference(tiny_ckpt, prompts, params)
    # one at a time: the fresh prefill compiles its first shapes (seconds each on a loaded
    # CPU), and a compile stalls its transfers; concurrency is covered above
    got = [pd_request(pre2, dec, 7000 + i, p, as_dict(sp)) for i, (p, sp) in enumerate(zip(prompts, params))]
    assert [g.get("tokens") for g in got] == ref, got
    pre2.wait_idle(), dec.wait_idle()
