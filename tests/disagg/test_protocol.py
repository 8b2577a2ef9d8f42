"""The P/D protocol suite, run on every transfer backend (inproc and real NIXL agents)."""

from __future__ import annotations

import time

import jax
import pytest

from tests.disagg.conftest import PAGE, edge_params, edge_prompts, unified_reference
from toolkit.disagg.protocol import RoomState
from toolkit.engine.request import SamplingParams


def settle(pair, seconds=10.0):
    t0 = time.perf_counter()
    while not (pair.prefill.idle() and pair.decode.idle()):
        pair.step()
        assert time.perf_counter() - t0 < seconds, "workers did not settle"


def test_pd_equals_unified_for_concurrent_edge_cases(tiny_ckpt, make_pair):
    """Guards against KV landing in the wrong decode pages, chunks sent before their KV was
    written, a lost partial last page, and a first token that differs from unified serving
    (16 concurrent requests incl. 1-token, page-aligned, multi-chunk, max_new_tokens=1)."""
    prompts, params = edge_prompts(16), edge_params(16)
    ref = unified_reference(tiny_ckpt, prompts, params)
    pair = make_pair(tiny_ckpt)
    got = pair.generate(prompts, params)
    assert [g.token_ids if not isinstance(g, str) else g for g in got] == ref
    assert got[3].finish_reason == "length" and len(got[3].token_ids) == 1
    assert pair.prefill.stats["rooms_ok"] == 16


def test_states_are_traced_in_order(tiny_ckpt, make_pair):
    """Guards against rooms skipping states or ending without Success on both sides."""
    pair = make_pair(tiny_ckpt)
    r = pair.submit(edge_prompts(5)[2], SamplingParams(max_new_tokens=3, ignore_eos=True))
    while not (r.state is RoomState.SUCCESS and r.seq.is_finished):
        pair.step()
    settle(pair)
    for w in (pair.prefill, pair.decode):
        states = [s for _, s in w.rooms[r.room].history]
        assert states == ["Bootstrapping", "WaitingForInput", "Transferring", "Success"], (w.role, states)
    assert len(pair.prefill.rooms[r.room].transfers) > 1, "a multi-chunk prompt must use several transfers"


def test_duplicate_room_rejected(tiny_ckpt, make_pair):
    """Guards against a reused room id crashing the worker or mixing two requests."""
    pair = make_pair(tiny_ckpt)
    p = edge_prompts(1)[0]
    r = pair.submit(p, SamplingParams(max_new_tokens=2), room=42)
    with pytest.raises(ValueError, match="room 42 is already in use"):
        pair.decode.submit(42, p, SamplingParams(), pair.prefill.control.address)
    with pytest.raises(ValueError, match="room 42 is already in use"):
        pair.prefill.submit(42, p, SamplingParams(), pair.decode.control.address)
    while not (r.state is RoomState.SUCCESS and r.seq.is_finished):
        pair.step()
    settle(pair)


def test_fault_injection_fails_only_affected_requests(tiny_ckpt, make_pair):
    """Guards against one failed transfer taking down other requests or the workers, and
    against pages leaking on either side when a transfer fails."""
    prompts, params = edge_prompts(16, seed=3), edge_params(16)
    ref = unified_reference(tiny_ckpt, prompts, params)
    pair = make_pair(tiny_ckpt, tcfg_kw=dict(fault_rate=0.3, fault_seed=1, quarantine_s=0.5))
    got = pair.generate(prompts, params)
    failed = [g for g in got if isinstance(g, str)]
    assert 0 < len(failed) < 16
    assert all("injected transfer fault" in g for g in failed)
    for g, want in zip(got, ref):
        if not isinstance(g, str):
            assert g.token_ids == want
    settle(pair)
    # the workers keep serving
    pair.prefill.tcfg.fault_rate = 0.0
    again = pair.generate(prompts[:4], params[:4])
    assert [g.token_ids for g in again] == ref[:4]


def test_layout_mismatch_fails_at_handshake(tiny_ckpt, make_pair):
    """Guards against two workers with different KV layouts exchanging pages (garbage KV)."""
    from toolkit.config.schema import TransferConfig
    from toolkit.disagg.pair import make_worker
    from toolkit.engine.engine import Engine
    from tests.conftest import engine_cfg

    pair = make_pair(tiny_ckpt)
    other = make_worker("decode", Engine(tiny_ckpt, engine_cfg(page_size=2 * PAGE)),
                        TransferConfig(backend=make_pair.backend))
    try:
        r = other.submit(7, [5, 6, 7], SamplingParams(max_new_tokens=2), pair.prefill.control.address)
        pair.prefill.submit(7, [5, 6, 7], SamplingParams(max_new_tokens=2), other.control.address)
        t0 = time.perf_counter()
        while not r.state.done and time.perf_counter() - t0 < 10:
            pair.prefill.tick()
            other.tick()
        assert r.state is RoomState.FAILED
        assert "page_size is 4 here and 8 on the peer" in r.error or "page_size is 8 here and 4" in r.error
        for _ in range(20):
            pair.prefill.tick()
            other.tick()
        assert other.engine.stats().pages_used == 0
    finally:
        other.close()


def test_checksum_detects_corruption(tiny_ckpt, make_pair):
    """Guards against silently decoding from corrupted KV when transfer.checksum is on."""
    pair = make_pair(tiny_ckpt, tcfg_kw=dict(checksum=True))
    prompts, params = edge_prompts(4, seed=5), edge_params(4)
    ref = unified_reference(tiny_ckpt, prompts, params)
    assert [g.token_ids for g in pair.generate(prompts, params)] == ref
    dec = pair.decode
    real = dec.backend.notifications
    # In place (donated): the pool stays at its registered address, as a real bit flip would.
    bump = jax.jit(lambda k, page: k.at[page].add(1.0), donate_argnums=0)

    def corrupting():  # flip the decode copy of each room's first page before the check
        out = real()
        for r in dec.active_rooms():
            if r.pages:
                pool = dec.engine.pool
                before = pool.buffer_pointers()
                pool.k = bump(pool.k, r.pages[0])
                assert pool.buffer_pointers() == before
        return out

    dec.backend.notifications = corrupting
    got = pair.generate(prompts[:2], params[:2])
    assert all(isinstance(g, str) and "KV checksum mismatch" in g for g in got)
    dec.backend.notifications = real
    settle(pair)


def test_aux_room_mismatch_detected(tiny_ckpt, make_pair):
    """Guards against decoding with another room's first token after an aux slot mix-up."""
    pair = make_pair(tiny_ckpt)
    dec = pair.decode
    real = dec.backend.notifications

    def swapping():
        out = real()
        for r in dec.active_rooms():
            if r.aux_slot is not None:
                dec.aux.records[r.aux_slot]["room"] = r.room + 1
        return out

    dec.backend.notifications = swapping
    got = pair.generate(edge_prompts(2, seed=6), SamplingParams(max_new_tokens=3))
    assert all(isinstance(g, str) and "slot mix-up" in g for g in got)
    dec.backend.notifications = real
    settle(pair)


def test_abort_during_transfer_frees_both_sides(tiny_ckpt, make_pair):
    """Guards against an aborted room leaving pages or aux slots allocated on either side,
    and against prefill writing on after decode gave the room up."""
    pair = make_pair(tiny_ckpt, tcfg_kw=dict(quarantine_s=5.0))
    p = edge_prompts(5)[2]  # 53 tokens, 4 prefill chunks: the abort lands after the first
    r = pair.submit(p, SamplingParams(max_new_tokens=5))
    pair.decode.tick()  # handshake + room metadata
    t0 = time.perf_counter()
    while pair.prefill.rooms[r.room].num_transfers == 0:
        pair.prefill.tick()  # one engine step = one chunk, then its transfer
    while r.state is not RoomState.TRANSFERRING:
        pair.prefill._poll()  # drive the posted transfer without computing more chunks
        pair.decode.tick()
        assert time.perf_counter() - t0 < 10
    pair.decode.abort(r.room, "client went away")
    pair.decode.tick()
    settle(pair)
    pr = pair.prefill.rooms[r.room]
    assert r.state is RoomState.FAILED and "client went away" in r.error
    assert pr.state is RoomState.FAILED and not pr.last_posted
    assert time.perf_counter() - t0 < 5, "decode waited for the quarantine instead of prefill's release"


def test_decode_times_out_when_prefill_never_answers(tiny_ckpt, make_pair):
    """Guards against decode waiting forever (and holding pages) for a prefill that never
    takes the room."""
    pair = make_pair(tiny_ckpt, tcfg_kw=dict(wait_timeout_s=0.5, quarantine_s=0.2))
    r = pair.decode.submit(99, [5, 6, 7, 8, 9], SamplingParams(), pair.prefill.control.address)
    t0 = time.perf_counter()
    while not r.state.done:
        pair.step()
    assert 0.4 < time.perf_counter() - t0 < 3
    assert "WaitingForInput timed out" in r.error
    settle(pair)
