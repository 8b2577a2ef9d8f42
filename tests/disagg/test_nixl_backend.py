"""The NIXL transfer backend, for real: UCX over loopback between this process (the prefill
initiator) and a spawned target process (decode) that reports what its pools held at the
moment each notification arrived.

Pools: L=3 layers, page 4 tokens, 2 KV heads, head_dim 8, float32; 9 pages here, 13 there.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
import traceback

import numpy as np
import pytest

os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs every agent creation at INFO

from toolkit.disagg.nixl_backend import NixlBackend, nixl_available  # noqa: E402
from toolkit.disagg.transfer import (AUX_DTYPE, AuxBuffer, LayoutMismatch, PoolLayout, TransferError,  # noqa: E402
                                     XferStatus)

L, PAGE, KV, DH = 3, 4, 2, 8
P_HERE, P_THERE = 9, 13
AUX_SLOTS = 4
STARTUP_S = 60  # a spawned peer imports numpy + NIXL (+ JAX): seconds, more on a loaded machine
STEP_S = 10  # any single transfer/notification on loopback takes milliseconds
PEER_MAX_LIFE_S = 180


@pytest.fixture(autouse=True)
def _needs_nixl():
    if not nixl_available():  # fail, not skip: a green run must not hide a missing install step
        pytest.fail("NIXL is not installed (pip install nixl-cu12, or -e '.[nixl]')")


def make_pool(num_pages: int, head_dim: int = DH, page: int = PAGE, kv: int = KV):
    shape = (num_pages, L, page, kv, head_dim)
    k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    return k, v, spec_for(k, v)


def spec_for(k, v, addresses=None) -> PoolLayout:
    """The placed page-major layout of host pools k, v [P, L, S, KV, Dh]."""
    p, _, s, kv, dh = k.shape
    addresses = addresses or (k.ctypes.data, v.ctypes.data)
    return PoolLayout(L, p, s, kv, dh, np.dtype(k.dtype).name).placed("DRAM", 0, addresses)


# ---- the target process ------------------------------------------------------------------------


def _serve(conn, cfg):
    """Target: register a pool + aux, hand out metadata, and for every notification send back
    (notif, K, V, aux) copied the moment it was seen. Exits on "exit", on parent death, or
    after PEER_MAX_LIFE_S."""
    ppid, deadline = os.getppid(), time.monotonic() + PEER_MAX_LIFE_S
    try:
        aux = AuxBuffer(AUX_SLOTS)
        if cfg.get("jax"):
            import jax
            import jax.numpy as jnp

            shape = (cfg["num_pages"], L, PAGE, KV, cfg["head_dim"])
            zeros = jax.jit(lambda: (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)))
            jk, jv = zeros()  # XLA-owned buffers, as a KVPool's are
            jk.block_until_ready()
            spec = spec_for(np.empty(shape, np.float32), None,
                            (jk.unsafe_buffer_pointer(), jv.unsafe_buffer_pointer()))
            total = jax.jit(lambda a: jnp.sum(a))

            def snapshot():
                # A jitted read first (what an engine step does), then the host view.
                sums = (float(total(jk)), float(total(jv)))
                return np.asarray(jk).copy(), np.asarray(jv).copy(), sums
        else:
            k, v, spec = make_pool(cfg["num_pages"], cfg["head_dim"], cfg["page"], cfg["kv"])

            def snapshot():
                # V's last layer first: the end of a request's descriptor list lands last.
                v_last = v[-1].copy()
                return k.copy(), v.copy(), v_last

        be = NixlBackend(cfg["name"], spec, aux)
        conn.send(("md", json.dumps(be.metadata())))
        while time.monotonic() < deadline and os.getppid() == ppid:
            if conn.poll(0.002) and conn.recv() == "exit":
                break
            for n in be.notifications():
                k_now, v_now, extra = snapshot()
                conn.send(("notif", n, k_now, v_now, aux.records.copy(), extra))
        be.close()
    except BaseException:  # noqa: BLE001 - report anything to the test
        conn.send(("error", traceback.format_exc()))


def initiator_pool(seed: int):
    k, v, spec = make_pool(P_HERE)
    rng = np.random.default_rng(seed)
    k[:] = rng.standard_normal(k.shape)
    v[:] = rng.standard_normal(v.shape)
    aux = AuxBuffer(AUX_SLOTS)
    aux.records[:] = [record(100 * seed + i) for i in range(AUX_SLOTS)]
    return k, v, spec, aux


def _initiate(conn, cfg):
    """Initiator: connect to cfg["target"], run cfg["writes"] one by one (reporting each
    status), then post cfg["spam"] writes without waiting and idle until killed."""
    ppid, deadline = os.getppid(), time.monotonic() + PEER_MAX_LIFE_S
    try:
        k, v, spec, aux = initiator_pool(cfg["seed"])
        be = NixlBackend(cfg["name"], spec, aux)
        name = be.connect(json.loads(cfg["target"]))
        for src, dst, slots, notif in cfg["writes"]:
            h = be.write(name, src, dst, slots, notif)
            conn.send(("done", drive(be, h).value))
            be.release(h)
        inflight = [be.write(name, list(range(P_HERE)), list(range(P_HERE)), (0, 0), b"spam")
                    for _ in range(cfg["spam"])]
        conn.send(("posted", len(inflight)))
        while time.monotonic() < deadline and os.getppid() == ppid:
            if conn.poll(0.01) and conn.recv() == "exit":
                break
            for h in inflight:
                be.status(h)
        be.close()
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))


class Peer:
    """A spawned process: a target (``_serve``, the default) or, with ``initiate=``, an
    initiator (``_initiate``) that writes into a target living in this process."""

    def __init__(self, name="decode0", num_pages=P_THERE, head_dim=DH, page=PAGE, kv=KV, jax=False,
                 initiate=None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        if initiate is None:
            cfg = dict(name=name, num_pages=num_pages, head_dim=head_dim, page=page, kv=kv, jax=jax)
        else:
            cfg = dict(initiate, name=name)
        self.proc = ctx.Process(target=_serve if initiate is None else _initiate, args=(child, cfg), daemon=True)
        self.proc.start()
        child.close()
        if initiate is None:
            msg = self.recv(STARTUP_S)
            assert msg[0] == "md", msg
            self.md = json.loads(msg[1])

    def recv(self, timeout):
        if not self.conn.poll(timeout):
            raise AssertionError(f"peer sent nothing in {timeout}s (alive={self.proc.is_alive()})")
        msg = self.conn.recv()
        if msg[0] == "error":
            raise AssertionError("peer failed:\n" + msg[1])
        return msg

    def no_message(self) -> bool:
        return not self.conn.poll(0)

    def kill(self):
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop(self):
        if self.proc.is_alive():
            try:
                self.conn.send("exit")
            except OSError:
                pass
            self.proc.join(10)
        self.kill()
        self.conn.close()


@pytest.fixture
def peers():
    made: list[Peer] = []

    def start(**kw) -> Peer:
        made.append(Peer(**kw))
        return made[-1]

    yield start
    for p in made:
        p.stop()


@pytest.fixture
def initiator():
    k, v, spec = make_pool(P_HERE)
    rng = np.random.default_rng(0)
    k[:] = rng.standard_normal(k.shape)
    v[:] = rng.standard_normal(v.shape)
    aux = AuxBuffer(AUX_SLOTS)
    made = []

    def make(**kw):
        made.append(NixlBackend("prefill0", spec, aux, **kw))
        return made[-1]

    yield make, k, v, aux
    for be in made:
        be.close()


def drive(be, handle, timeout=STEP_S) -> XferStatus:
    """Poll until DONE/ERR (polling drives progress); fail, never hang, past the timeout."""
    end = time.monotonic() + timeout
    while (s := be.status(handle)) is XferStatus.PROC:
        assert time.monotonic() < end, f"transfer still PROC after {timeout}s"
        time.sleep(0.0005)
    return s


def notification(peer: Peer, timeout=STEP_S):
    _, n, k, v, aux, extra = peer.recv(timeout)
    return n, k, v, aux, extra


def record(room, token=0):
    return np.array((room, token, -0.25 * room, 1000 + room, 3, 0), AUX_DTYPE)


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(split_aux=False), dict(split_aux=True),
                                dict(backend_params={"UCX": {"num_threads": 2, "split_batch_size": 4}})],
                         ids=["one-request", "pages-then-aux", "ucx-threads"])
def test_pages_and_aux_land_exactly_before_the_notification(peers, initiator, kw):
    """Guards against: pages landing at the wrong place (index math with P=9 here vs P=13
    there, K/V or layer mix-ups), writes touching pages they were not given, the aux record
    not landing, and the notification overtaking its data (the target snapshots its pools the
    moment it sees each notification). ``pages-then-aux`` is the two-request path used for VRAM
    pools, where the notification rides on the second request; ``ucx-threads`` splits each
    write's descriptors across UCX worker threads (``backend_params``)."""
    make, k, v, aux = initiator
    be = make(**kw)
    peer = peers()
    name = be.connect(json.loads(json.dumps(peer.md)))  # the handshake payload survives JSON
    assert name == "decode0" and be.connect(peer.md) == name  # idempotent

    rng = np.random.default_rng(1)
    want_k = np.zeros((P_THERE, L, PAGE, KV, DH), np.float32)
    want_v = np.zeros_like(want_k)
    want_aux = np.zeros(AUX_SLOTS, AUX_DTYPE)
    for room in range(12):
        k[:] = rng.standard_normal(k.shape)
        v[:] = rng.standard_normal(v.shape)
        n = int(rng.integers(1, P_HERE + 1))
        src = rng.permutation(P_HERE)[:n].tolist()
        dst = rng.permutation(P_THERE)[:n].tolist()
        src_slot, dst_slot = int(rng.integers(AUX_SLOTS)), int(rng.integers(AUX_SLOTS))
        aux.records[src_slot] = record(room, token=7 * room)
        h = be.write(name, src, dst, (src_slot, dst_slot), b"room-%d" % room)
        assert drive(be, h) is XferStatus.DONE
        be.release(h)
        want_k[dst] = k[src]
        want_v[dst] = v[src]
        want_aux[dst_slot] = aux.records[src_slot]

        got, gk, gv, gaux, _ = notification(peer)
        assert got == b"room-%d" % room
        np.testing.assert_array_equal(gk, want_k, err_msg=f"K after room {room}: {src} -> {dst}")
        np.testing.assert_array_equal(gv, want_v, err_msg=f"V after room {room}: {src} -> {dst}")
        assert np.array_equal(gaux, want_aux), (gaux, want_aux)
    assert peer.no_message()


@pytest.mark.parametrize("split_aux", [False, True], ids=["one-request", "pages-then-aux"])
def test_notification_never_overtakes_a_large_write(peers, split_aux):
    """Guards against: the notification being sent apart from (or before the end of) the data
    it announces, e.g. a standalone notif or an aux request posted before the pages finished.
    With the small pools that race is invisible on loopback, so this moves ~24 MiB per write
    (pages of 256 KiB) and the target checks V's last layer (the tail of the descriptor list)
    first thing when the notification shows up."""
    page, kv, dh, pages = 64, 8, 128, 16
    k, v, spec = make_pool(pages, dh, page, kv)
    aux = AuxBuffer(AUX_SLOTS)
    be = NixlBackend("prefill-big", spec, aux, split_aux=split_aux)
    peer = peers(num_pages=pages, head_dim=dh, page=page, kv=kv)
    try:
        name = be.connect(peer.md)
        for room in range(1, 6):
            k[:] = room
            v[:] = -room
            aux.records[0] = record(room)
            h = be.write(name, list(range(pages)), list(range(pages))[::-1], (0, 0), b"big-%d" % room)
            assert drive(be, h) is XferStatus.DONE
            be.release(h)
            got, gk, gv, gaux, v_last = notification(peer)
            assert got == b"big-%d" % room
            assert (v_last == -room).all(), f"room {room}: notification arrived before V's last layer landed"
            assert (gk == room).all() and (gv == -room).all() and gaux[0] == aux.records[0]
    finally:
        be.close()


def test_aux_only_and_empty_writes_deliver_their_notification(peers, initiator):
    """Guards against: a zero-page write (aux record only) moving no aux or touching the pools,
    and a write with neither pages nor aux never delivering its notification (NIXL rejects an
    empty request, so it must go as a standalone notification)."""
    make, k, v, aux = initiator
    be = make()
    peer = peers()
    name = be.connect(peer.md)

    aux.records[1] = record(5, token=42)
    h = be.write(name, [], [], (1, 2), b"aux-only")
    assert drive(be, h) is XferStatus.DONE
    be.release(h)
    got, gk, gv, gaux, _ = notification(peer)
    assert got == b"aux-only"
    assert not gk.any() and not gv.any()
    assert gaux[2] == aux.records[1] and not gaux[[0, 1, 3]].view(np.uint8).any()

    h = be.write(name, [], [], None, b"bare")
    assert be.status(h) is XferStatus.DONE
    be.release(h)
    got, gk, gv, gaux, _ = notification(peer)
    assert got == b"bare" and not gk.any() and not gv.any() and gaux[2] == aux.records[1]


def test_layout_mismatch_fails_at_connect(peers, initiator, monkeypatch):
    """Guards against: connecting to a peer whose pages mean something else (head_dim 16 vs 8)
    and silently writing garbage. The check must happen before NIXL learns about the peer and
    name both values; different num_pages is fine."""
    make, *_ = initiator
    be = make()
    peer = peers(head_dim=16)
    added = []
    real_add = be._agent.add_remote_agent
    monkeypatch.setattr(be._agent, "add_remote_agent", lambda md: added.append(md) or real_add(md))
    with pytest.raises(LayoutMismatch, match=r"head_dim is 8 here and 16 on the peer"):
        be.connect(peer.md)
    # A peer built with another pool order (e.g. an older, layer-major build) is refused too.
    other = json.loads(json.dumps(peer.md))
    other["layout"].update(head_dim=DH, order="layer_major")
    with pytest.raises(LayoutMismatch, match=r"order is 'page_major' here and 'layer_major' on the peer"):
        be.connect(other)
    assert added == [] and be.peers == []
    with pytest.raises(TransferError, match="unknown peer"):
        be.write("decode0", [0], [0], None, b"x")


def test_target_death_gives_errors_not_hangs_and_a_fresh_target_works(peers, initiator):
    """Guards against: the initiator hanging on (or crashing from) transfers to a decode
    process that was killed: in-flight transfers must end DONE or ERR, later writes must fail
    as TransferError at write or ERR from status (NIXL raises nixlRemoteDisconnectError, which
    must be caught), and the initiator must be able to connect to a restarted target that
    reuses the dead one's name."""
    make, k, v, aux = initiator
    be = make()
    dead = peers(name="decode0")
    name = be.connect(dead.md)
    h = be.write(name, [0, 1], [3, 4], (0, 0), b"before")
    assert drive(be, h) is XferStatus.DONE
    be.release(h)
    assert notification(dead)[0] == b"before"

    inflight = [be.write(name, list(range(P_HERE)), list(range(P_HERE)), (0, i % AUX_SLOTS), b"x%d" % i)
                for i in range(8)]
    dead.kill()
    for h in inflight:
        assert drive(be, h) in (XferStatus.DONE, XferStatus.ERR)  # DONE: it left before the kill
        be.release(h)

    failures, end = [], time.monotonic() + STEP_S
    while len(failures) < 3:
        assert time.monotonic() < end, f"writes to a dead peer kept succeeding: {failures}"
        try:
            h = be.write(name, [2, 5], [7, 1], (1, 1), b"after")
        except TransferError as e:
            failures.append(f"write: {e}")
            continue
        s = drive(be, h)
        if s is XferStatus.ERR:
            failures.append(f"status: {h.error}")
            assert be.status(h) is XferStatus.ERR  # sticky, still no exception
        else:
            time.sleep(0.02)  # the disconnect has not been noticed yet
        be.release(h)
    with pytest.raises(TransferError):
        be.write(name, [], [], None, b"bare-after")

    fresh = peers(name="decode0")
    assert be.connect(fresh.md) == "decode0"  # replaces the dead incarnation
    h = be.write(name, [8, 0], [12, 5], (2, 3), b"fresh")
    assert drive(be, h) is XferStatus.DONE
    be.release(h)
    got, gk, gv, gaux, _ = notification(fresh)
    assert got == b"fresh"
    np.testing.assert_array_equal(gk[[12, 5]], k[[8, 0]])
    np.testing.assert_array_equal(gv[[12, 5]], v[[8, 0]])
    assert gaux[3] == aux.records[2]

    be.disconnect(name)
    assert be.peers == []
    with pytest.raises(TransferError, match="unknown peer"):
        be.write(name, [0], [0], None, b"x")


def test_jax_cpu_array_registered_by_buffer_pointer(peers):
    """Guards against: registering the JAX pools (how engines use this backend) not working,
    i.e. writes going to a stale/copied buffer: the target's pools are XLA-allocated JAX arrays
    registered by ``unsafe_buffer_pointer()``, and what the initiator (also JAX arrays) writes
    must be visible through those arrays to a jitted read and to a host read afterwards."""
    import jax

    shape = (P_HERE, L, PAGE, KV, DH)
    rng = np.random.default_rng(3)
    hk, hv = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    jk, jv = jax.jit(lambda a, b: (a + 0, b + 0))(hk, hv)  # fresh XLA buffers, not numpy aliases
    jk.block_until_ready()
    spec = spec_for(hk, hv, (jk.unsafe_buffer_pointer(), jv.unsafe_buffer_pointer()))
    aux = AuxBuffer(AUX_SLOTS)
    aux.records[0] = record(9)
    peer = peers(jax=True)
    be = NixlBackend("prefill-jax", spec, aux)
    try:
        name = be.connect(peer.md)
        src, dst = [6, 2, 3], [10, 0, 11]
        h = be.write(name, src, dst, (0, 1), b"jax")
        assert drive(be, h) is XferStatus.DONE
        be.release(h)
        got, gk, gv, gaux, sums = notification(peer, timeout=STARTUP_S)
    finally:
        be.close()
    want_k = np.zeros((P_THERE, L, PAGE, KV, DH), np.float32)
    want_v = np.zeros_like(want_k)
    want_k[dst], want_v[dst] = hk[src], hv[src]
    assert got == b"jax"
    np.testing.assert_array_equal(gk, want_k)
    np.testing.assert_array_equal(gv, want_v)
    np.testing.assert_allclose(sums, (want_k.sum(), want_v.sum()), rtol=1e-5)
    assert gaux[1] == aux.records[0]


def test_target_survives_initiator_death_and_serves_the_next(peers):
    """Guards against the decode side being poisoned by a prefill that died with writes in
    flight: its ``notifications()`` must not raise or hang afterwards, and a restarted prefill
    reusing the dead one's agent name (and then a new one) must be able to write into it."""
    k, v, spec = make_pool(P_THERE)
    aux = AuxBuffer(AUX_SLOTS)
    tb = NixlBackend("decode0", spec, aux)
    seen: list[bytes] = []

    def pump_until(peer, kind, timeout=STARTUP_S):
        end = time.monotonic() + timeout
        while not peer.conn.poll(0.002):
            seen.extend(tb.notifications())
            assert time.monotonic() < end, f"no {kind!r} from the initiator in {timeout}s"
        msg = peer.recv(0)
        assert msg[0] == kind, msg
        return msg

    try:
        md = json.dumps(tb.metadata())
        first = peers(name="prefill0", initiate=dict(target=md, seed=1, spam=50,
                                                     writes=[([1], [2], None, b"hello-1")]))
        assert pump_until(first, "done")[1] == "DONE"
        pump_until(first, "posted")
        first.kill()
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            seen.extend(tb.notifications())
        assert seen[0] == b"hello-1" and set(seen[1:]) <= {b"spam"}, seen[:5]

        for name, seed in (("prefill0", 2), ("prefill1", 3)):
            seen.clear()
            writes = [([3, 8], [5, 11], (1, 2), b"room-%d" % seed)]
            nxt = peers(name=name, initiate=dict(target=md, seed=seed, spam=0, writes=writes))
            assert pump_until(nxt, "done")[1] == "DONE"
            end = time.monotonic() + STEP_S
            while b"room-%d" % seed not in seen:
                assert time.monotonic() < end, f"no notification from {name}: {seen}"
                seen.extend(tb.notifications())
            sk, sv, _, saux = initiator_pool(seed)
            np.testing.assert_array_equal(k[[5, 11]], sk[[3, 8]])
            np.testing.assert_array_equal(v[[5, 11]], sv[[3, 8]])
            assert aux.records[2] == saux.records[1]
            nxt.stop()
    finally:
        tb.close()


def test_idle_agent_does_not_spin_a_core():
    """Guards against NIXL's progress thread busy-spinning (its Python API hard-codes a 0 us
    pause): one idle agent then eats a whole core, and a prefill+decode pair in one process
    starves the engines on a 2-core machine. The backend's agent must idle near 0% CPU."""
    from toolkit.disagg.nixl_backend import _nixl_api

    api = _nixl_api()
    original = api.nixlBind.nixlAgentConfig
    k, v, spec = make_pool(P_HERE)
    be = NixlBackend("idle0", spec, AuxBuffer(AUX_SLOTS))
    try:
        assert api.nixlBind.nixlAgentConfig is original  # the temporary swap was undone
        t = os.times()
        time.sleep(1.0)
        used = sum(os.times()[:2]) - sum(t[:2])
    finally:
        be.close()
    assert used < 0.3, f"{used:.2f} s of CPU in 1 s of idling"
