"""The host and storage tiers (toolkit/cache/tiers.py) under the cache manager, over a real
KV pool (JAX on CPU), real host arrays and real NIXL POSIX file writes.

The pool's pages hold numbers derived from the tokens they were "computed" for, so a
match that maps in a page holding another prefix's KV (the contamination SGLang's offload
produced: sgl-project/sglang#24226) is caught by value, not only by counting."""

from __future__ import annotations

import random

import numpy as np
import pytest

from toolkit.cache.manager import CacheManager
from toolkit.cache.pool import KVPool, PoolLayout
from toolkit.cache.radix import hash_seed
from toolkit.cache import tiers as T

S = 2  # page size
LAYOUT = PoolLayout(num_layers=2, num_pages=24, page_size=S, num_kv_heads=1, head_dim=4, dtype="float32")
SEED = hash_seed("tiers-test", S)


def kv_of(tokens) -> tuple[np.ndarray, np.ndarray]:
    """What 'computing' a page of ``tokens`` writes: [L, S, KV, Dh] for K and V, unique per
    (prefix, position) so another prefix's page never compares equal."""
    t = np.asarray(tokens, np.float32)
    k = np.broadcast_to(t[None, :, None, None] + 1000 * np.arange(LAYOUT.num_layers)[:, None, None, None],
                        LAYOUT.shape[1:]).astype(np.float32)
    return k, -k


def make(tmp_path=None, host=6, storage=0, pages=LAYOUT.num_pages, pinned=None):
    pool = KVPool(PoolLayout(**{**LAYOUT.__dict__, "num_pages": pages}))
    mgr = CacheManager(pages, S, "radix", seed=SEED)
    tiers = T.KVTiers(T.PoolMover(pool), LAYOUT, host, SEED,
                      storage_path=str(tmp_path) if storage else "", storage_slots=storage, pinned=pinned)
    mgr.attach_tiers(tiers)
    return pool, mgr, tiers


def write(pool, mover, tokens, pages, first_page=0):
    """'Compute' the KV of ``tokens`` into ``pages`` (page j holds tokens of page first_page+j)."""
    ks, vs = zip(*(kv_of(tokens[(first_page + j) * S:(first_page + j + 1) * S]) for j in range(len(pages))))
    mover.scatter(pages, np.stack(ks), np.stack(vs))


def assert_holds(pool, tokens, pages):
    k = np.asarray(pool.k)
    for i, p in enumerate(pages):
        want, _ = kv_of(tokens[i * S:(i + 1) * S])
        assert np.array_equal(k[p], want), f"page {p} (prefix page {i}) holds another prefix's KV"


def run_request(pool, mgr, tiers, tokens):
    """Admit, 'compute' past the match, commit, release: the manager's side of one request."""
    node, cached = mgr.match(tokens[:-1])  # (the last token is always computed: its logits)
    assert_holds(pool, tokens, cached)
    need = len(tokens) // S - len(cached)
    if not mgr.can_allocate(need):
        mgr.unlock_now(node)
        return None
    new = mgr.allocate(need)
    write(pool, tiers.mover, tokens, new, first_page=len(cached))
    pages, node = mgr.commit(tokens, cached + new, node)
    mgr.release(tokens, pages, node)
    return len(cached)


def test_slot_generation_stops_a_late_copy_publishing():
    """Guards against a copy that ends after its slot was invalidated (tier cleared or
    turned off) publishing its key into a slot that is free or handed out again."""
    sp = T.SlotPool(2, "host")
    (slot, gen), = sp.allocate([b"a"])
    sp.invalidate()  # e.g. storage turned off while the copy was in flight
    assert not sp.has(b"a")
    assert not sp.end_write(slot, gen, ok=True), "a late copy published into an invalidated slot"
    assert sp.lookup(b"a") is None and sp.num_free == 2
    sp.check()


@pytest.mark.parametrize("seed", range(3))
def test_slot_pool_random_operations_keep_every_state_consistent(seed):
    """Guards against a slot in two states (free and indexed, read while being evicted,
    written twice): random interleavings of allocate / end_write / pin / unpin / drop /
    invalidate against a model, checking every invariant after each operation."""
    rng = random.Random(seed)
    sp = T.SlotPool(8, "host")
    writing: list[tuple[bytes, int, int]] = []  # (key, slot, gen) copies in flight
    pinned: list[int] = []
    published: dict[bytes, int] = {}
    for step in range(2500):
        op = rng.random()
        if op < 0.3:
            keys = [bytes([rng.randrange(40)]) for _ in range(rng.randint(1, 3))]
            keys = [k for i, k in enumerate(keys) if k not in keys[:i] and not sp.has(k)]
            if keys and sp.can_allocate(len(keys)):
                for k, (slot, gen) in zip(keys, sp.allocate(keys)):
                    writing.append((k, slot, gen))
        elif op < 0.55 and writing:
            k, slot, gen = writing.pop(rng.randrange(len(writing)))
            ok = rng.random() < 0.8
            if sp.end_write(slot, gen, ok):
                published[k] = slot
        elif op < 0.7 and sp.index:
            slot = sp.lookup(rng.choice(list(sp.index)))
            sp.pin(slot)
            pinned.append(slot)
        elif op < 0.85 and pinned:
            sp.unpin(pinned.pop(rng.randrange(len(pinned))))
        elif op < 0.95 and sp.index:
            key = rng.choice(list(sp.index))
            slot = sp.index[key]
            assert (sp.drop(key) is None) == (slot in pinned), "dropped a slot a copy reads"
        elif op >= 0.995:
            sp.invalidate()
        for slot in pinned:
            assert sp.state[slot] == T.READY, "a slot a copy reads was evicted"
        sp.check()
    for slot in pinned:
        sp.unpin(slot)
    for k, slot, gen in writing:
        sp.end_write(slot, gen, ok=False)
    sp.invalidate()
    assert sp.num_free == sp.num_slots, "slots missing once every copy ended"


@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned"])
def test_round_trips_are_bit_exact(tmp_path, pinned):
    """Guards against a page coming back from host or storage with other bytes (a wrong
    slot, a wrong offset in the file, K and V swapped, a reused pinned batch): device ->
    host -> file, then a fresh tier set (a restart) reads it back into other device pages.
    ``pinned`` (page-locked host buffers, torch's threads) needs a GPU."""
    if pinned and not T._pinned_torch_ok():
        pytest.skip("page-locked host memory needs torch with CUDA (a GPU host)")
    pool, mgr, tiers = make(tmp_path, host=8, storage=16, pinned=pinned)
    rng = np.random.default_rng(0)
    shape = (4,) + LAYOUT.shape[1:]
    k, v = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    src = [3, 9, 4, 17]
    tiers.mover.scatter(src, k, v)
    keys = [bytes([i]) * 16 for i in range(4)]
    assert tiers.backup(src, keys) is not None
    tiers.drain()
    for i, key in enumerate(keys):
        h = tiers.host.slots.lookup(key)
        assert np.array_equal(tiers.host.k[h], k[i]) and np.array_equal(tiers.host.v[h], v[i])
    assert tiers.stats().storage_used == 4
    tiers.close()

    pool2, mgr2, tiers2 = make(tmp_path, host=8, storage=16, pinned=pinned)  # restart: the index is read back
    hits = tiers2.lookup(keys)
    assert [t for t, _ in hits] == ["storage"] * 4
    assert tiers2.load(keys, hits, [5, 6, 7, 8]) == 4
    assert np.array_equal(np.asarray(pool2.k)[[5, 6, 7, 8]], k)
    assert np.array_equal(np.asarray(pool2.v)[[5, 6, 7, 8]], v)
    assert [t for t, _ in tiers2.lookup(keys)] == ["host"] * 4, "storage pages loaded did not land in host"
    tiers2.close()


def test_held_open_copy_pins_pages_and_releases_once(monkeypatch):
    """Guards against the SGLang offload bug: a finished request's pages freed (and reused)
    while the device -> host copy reading them is still in flight. The copy's completion is
    held back: its pages must be neither evictable nor free, the request's release must not
    free them, and once the copy is observed complete they become evictable exactly once."""
    ready = {"now": False}
    real = T._copy_ready
    monkeypatch.setattr(T, "_copy_ready", lambda arrays: ready["now"] and real(arrays))
    pool, mgr, tiers = make(host=8)
    tokens = list(range(1, 9))  # 4 pages
    node, cached = mgr.match(tokens)
    pages = mgr.allocate(4)
    write(pool, tiers.mover, tokens, pages)
    pages, node = mgr.commit(tokens, pages, node)  # write-through starts a copy of 4 pages
    assert tiers.stats().copies_inflight == 1
    mgr.release(tokens, pages, node)  # the request finishes while the copy is in flight
    mgr.release(tokens, [], None)  # a second release does nothing
    mgr.check()
    assert mgr.num_evictable == 0, "pages of a copy in flight are evictable"
    assert not mgr.can_allocate(mgr.num_free + 1), "pages of a copy in flight can be handed out"
    for _ in range(3):
        assert mgr.poll_copies() == 0
    assert mgr.num_evictable == 0 and mgr.num_cached == 4
    ready["now"] = True
    assert mgr.poll_copies() == 1
    assert mgr.num_evictable == 4, "the copy's pages were not released exactly once"
    assert mgr.poll_copies() == 0
    mgr.check()
    assert mgr.flush() == 4 and mgr.all_free()
    hits = tiers.lookup([h for h in _hashes(tokens)])
    assert len(hits) == 4, "the held copy never published its pages"


def _hashes(tokens):
    from toolkit.cache.radix import page_hash

    prev, out = SEED, []
    for i in range(len(tokens) // S):
        prev = page_hash(prev, tokens[i * S:(i + 1) * S])
        out.append(prev)
    return out


@pytest.mark.parametrize("seed", range(2))
def test_random_interleavings_never_map_in_another_prefix(tmp_path, seed, monkeypatch):
    """Guards against contamination and lost pages under every interleaving: requests with
    shared and diverging prefixes run through a device pool small enough to evict all the
    time, copies complete at random moments (some held open for many operations), the
    device tree is flushed now and then (so matches reach host and storage), and every
    matched page is checked by value; the manager's accounting is checked after every
    operation and the pool is whole at the end."""
    rng = random.Random(seed)
    held = set()
    real = T._copy_ready
    monkeypatch.setattr(T, "_copy_ready", lambda arrays: id(arrays) not in held and real(arrays))
    pool, mgr, tiers = make(tmp_path, host=10, storage=40, pages=12)
    prefixes = [[rng.randrange(1, 50) for _ in range(6)] for _ in range(4)]
    hits = 0
    for step in range(300):
        op = rng.random()
        if op < 0.6:
            tokens = rng.choice(prefixes) + [rng.randrange(1, 50) for _ in range(2 * rng.randint(0, 3))]
            got = run_request(pool, mgr, tiers, tokens)
            hits += bool(got)
            for c in tiers.inflight:  # hold some copies open for a while
                if c.kind == "d2h" and rng.random() < 0.3:
                    held.add(id(c.arrays))
        elif op < 0.85:
            if held and rng.random() < 0.5:
                held.discard(rng.choice(sorted(held)))
            mgr.poll_copies()
        elif op < 0.95:
            held.clear()
            mgr.flush()
        else:
            mgr.release([], [], None)  # idempotent no-op
        mgr.check()
    held.clear()
    mgr.flush()
    mgr.check()
    assert mgr.all_free(), "device pages missing after every copy ended"
    assert hits > 50
    st = tiers.stats()
    assert st.loaded_pages["host"] > 0 and st.loaded_pages["storage"] > 0, st
    tiers.close()


def test_corrupt_storage_page_is_dropped_and_the_run_truncated(tmp_path, caplog):
    """Guards against serving a corrupted file page: a flipped byte fails the page's CRC,
    the load stops before it (the rest is recomputed), the page is dropped from the index."""
    pool, mgr, tiers = make(tmp_path, host=4, storage=8)
    tokens = list(range(1, 7))  # 3 pages
    assert run_request(pool, mgr, tiers, tokens) == 0
    tiers.drain()
    tiers.close()
    f = tmp_path / "pages.bin"
    fs_slot = 1  # the second page written (slots are handed out lowest first)
    data = bytearray(f.read_bytes())
    data[fs_slot * 2 * tiers.host.slot_bytes + 5] ^= 0xFF
    f.write_bytes(bytes(data))
    pool, mgr, tiers = make(tmp_path, host=4, storage=8)
    with caplog.at_level("ERROR"):
        keys = _hashes(tokens)
        hits = tiers.lookup(keys)
        assert len(hits) == 3
        assert tiers.load(keys, hits, [1, 2, 3]) == 1, "loaded past a page that fails its checksum"
    assert "checksum" in caplog.text
    assert len(tiers.lookup(keys)) == 1
    tiers.close()


def test_a_full_host_tier_evicts_a_chain_from_its_end():
    """Guards against a host tier that evicts the start of a prefix and strands the rest (a
    hit needs the chain unbroken from page 0, so the later pages would take slots and never
    hit): with 4 host slots holding one 4-page prefix, a new 2-page prefix must take the
    first prefix's last two pages, and its first two still hit."""
    pool, mgr, tiers = make(host=4)
    first, other = list(range(1, 10)), list(range(50, 55))  # 4 and 2 whole pages (+1 token)
    run_request(pool, mgr, tiers, first)
    mgr.poll_copies(block=True)
    run_request(pool, mgr, tiers, other)
    mgr.poll_copies(block=True)
    assert len(tiers.lookup(_hashes(other[:-1]))) == 2
    assert len(tiers.lookup(_hashes(first[:-1]))) == 2, "the host tier evicted the start of a prefix"
    mgr.flush()
    tiers.close()
