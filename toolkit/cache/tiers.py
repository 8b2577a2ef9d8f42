"""Host and storage tiers below the device prefix cache (``cache.host_pages``, ``cache.storage=file``).

Pages are keyed by their chained page hash (``toolkit.cache.radix.page_hash``, seeded with
model, dtype, page size and pool layout): a key names a whole prefix, so a lower tier is a
flat map from key to slot, and a hit on page i is only usable after hits on pages 0..i-1.

    device pool  [P, L, S, KV, Dh]  the radix tree's pages (toolkit/cache/manager.py)
       | write-through: every page entering the tree is copied down (``backup``)
       v
    host tier    [H, L, S, KV, Dh]  x2 (K, V), numpy, allocated and touched at start-up
       | write-through (when storage is on), by NIXL's POSIX plugin
       v
    file tier    F fixed slots of one page (K then V) in one preallocated file, with an
                 append-only index (``index.log``: key, slot, CRC32) replayed at start-up

A match walks the device tree, then continues the chain of keys in host, then in storage;
those pages are loaded back into device pages (storage -> host -> device) before the
request's prefill is scheduled, and enter the tree.

The safety rule (SGLang shipped the opposite, sgl-project/sglang#24226: offloading freed
pages decode still read, and released pages with device->host copies in flight):

- Every slot of a tier is in exactly one state (``SlotPool``): FREE, READY (holds the page
  of one key; ``readers`` copies are reading it) or WRITING (the destination of a copy in
  flight). Every transition asserts its precondition.
- A copy leaves "in flight" only when its completion is observed: the host array is ready
  (device -> host), NIXL reports DONE or ERR (host <-> file).
- The device pages a copy reads stay locked in the tree (the copy holds a tree lock) until
  the copy is observed complete: no eviction, no reuse. A request that finishes meanwhile
  drops only its own lock; its pages reach the allocator once every lock is gone.
- A slot's generation moves on every allocation and invalidation; a copy publishes its key
  only if its slot's generation is the one it was given, so a late copy never publishes
  into a reused or invalidated slot.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import functools
import json
import logging
import os
import time
import warnings
import zlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention_ref import gather_pages, scatter_pages
from toolkit.cache.pool import KVPool, PoolLayout

log = logging.getLogger(__name__)

FREE, READY, WRITING = "free", "ready", "writing"
GIB = 1 << 30


class SlotPool:
    """The slots of one tier (host memory, or a file): the one owner that hands them out,
    indexes them by key, evicts the least recently used and checks its own integrity."""

    def __init__(self, num_slots: int, name: str):
        assert num_slots >= 1
        self.name = name
        self.num_slots = num_slots
        self.state = [FREE] * num_slots
        self.gen = [0] * num_slots  # moves on every allocate and invalidate
        self.readers = [0] * num_slots  # copies in flight reading a READY slot
        self.key: list[Optional[bytes]] = [None] * num_slots
        self.index: dict[bytes, int] = {}  # key -> READY slot
        self.writing: dict[bytes, int] = {}  # key -> WRITING slot (a copy will publish it)
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # READY, oldest first
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: lowest slot first
        self._num_read = 0  # READY slots with readers > 0 (not evictable)

    # ---- counts ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_ready(self) -> int:
        return len(self.index)

    @property
    def num_used(self) -> int:
        return self.num_slots - self.num_free

    def _evictable(self):
        return (s for s in self._lru if self.readers[s] == 0)

    # ---- lookups --------------------------------------------------------------------

    def has(self, key: bytes) -> bool:
        """Held or on its way (a copy in flight will publish it)."""
        return key in self.index or key in self.writing

    def lookup(self, key: bytes) -> Optional[int]:
        """The READY slot of ``key`` (touched for LRU), or None."""
        slot = self.index.get(key)
        if slot is not None:
            self._lru.move_to_end(slot)
        return slot

    def touch_chain(self, keys: Sequence[bytes]) -> None:
        """Mark a chain of keys used, its first key the most recent: a hit needs the chain
        unbroken from its start, so the pages at its end go first, never its start."""
        for key in reversed(keys):
            slot = self.index.get(key)
            if slot is not None:
                self._lru.move_to_end(slot)

    # ---- transitions ----------------------------------------------------------------

    @property
    def num_evictable(self) -> int:
        return len(self.index) - self._num_read

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free + self.num_evictable

    def allocate(self, keys: Sequence[bytes]) -> list[tuple[int, int]]:
        """One WRITING slot per key (``can_allocate`` first), evicting unread READY slots,
        least recently used first. Returns (slot, generation) pairs: the copy filling a slot
        ends it with ``end_write`` carrying that generation."""
        assert self.can_allocate(len(keys)), f"{self.name}: no {len(keys)} slots"
        out = []
        for key in keys:
            assert not self.has(key), f"{self.name}: key already held or being written"
            if not self._free:
                self._drop(next(self._evictable()))
            slot = self._free.pop()
            assert self.state[slot] == FREE
            self.state[slot], self.key[slot] = WRITING, key
            self.gen[slot] += 1
            self.writing[key] = slot
            out.append((slot, self.gen[slot]))
        return out

    def end_write(self, slot: int, gen: int, ok: bool) -> bool:
        """The copy into ``slot`` is observed complete (``ok``) or failed. Publishes its key
        only if it succeeded and the slot's generation is still ``gen`` (not invalidated
        meanwhile); otherwise the slot is free again. Returns whether it was published."""
        assert self.state[slot] == WRITING, f"{self.name}: slot {slot} is {self.state[slot]}, not writing"
        key = self.key[slot]
        if self.writing.get(key) == slot:
            del self.writing[key]
        if ok and gen == self.gen[slot]:
            self.state[slot] = READY
            self.index[key] = slot
            self._lru[slot] = None
            return True
        self._to_free(slot)
        return False

    def pin(self, slot: int) -> None:
        """A copy reads ``slot``: it is not evicted until ``unpin``."""
        assert self.state[slot] == READY, f"{self.name}: pin of a {self.state[slot]} slot"
        self._num_read += self.readers[slot] == 0
        self.readers[slot] += 1

    def unpin(self, slot: int) -> None:
        assert self.readers[slot] > 0, f"{self.name}: unpin without pin"
        self.readers[slot] -= 1
        self._num_read -= self.readers[slot] == 0

    def drop(self, key: bytes) -> Optional[int]:
        """Forget ``key`` (a page that failed its checksum); its slot is free unless a copy
        reads it. Returns the slot, or None."""
        slot = self.index.get(key)
        if slot is None or self.readers[slot]:
            return None
        self._drop(slot)
        return slot

    def _drop(self, slot: int) -> None:
        assert self.state[slot] == READY and self.readers[slot] == 0
        del self.index[self.key[slot]]
        del self._lru[slot]
        self._to_free(slot)

    def _to_free(self, slot: int) -> None:
        self.state[slot], self.key[slot] = FREE, None
        self.gen[slot] += 1
        self._free.append(slot)

    def invalidate(self) -> None:
        """Forget everything (the tier is turned off or cleared): READY slots no copy reads
        are free at once; the copies in flight end unpublished (their generation moved)."""
        for slot in list(self._evictable()):
            self._drop(slot)
        for slot in self.writing.values():
            self.gen[slot] += 1
        self.writing.clear()

    def restore(self, key: bytes, slot: int) -> None:
        """A READY slot read back from a persisted index (start-up only)."""
        assert self.state[slot] == FREE and key not in self.index
        self._free.remove(slot)
        self.state[slot], self.key[slot] = READY, key
        self.index[key] = slot
        self._lru[slot] = None

    def check(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), f"{self.name}: a slot free twice"
        for s in range(self.num_slots):
            st = self.state[s]
            assert (s in free) == (st == FREE), f"{self.name}: slot {s} {st} vs free list"
            if st == READY:
                assert self.index.get(self.key[s]) == s and s in self._lru
            else:
                assert s not in self._lru and self.readers[s] == 0, f"{self.name}: slot {s} {st} read"
        assert len(self.index) == len(self._lru)
        assert self._num_read == sum(1 for s in self._lru if self.readers[s]), f"{self.name}: read count"
        for key, s in self.writing.items():
            assert self.state[s] == WRITING and self.key[s] == key


# ---- device <-> host ------------------------------------------------------------------


def _bucket(n: int) -> int:
    """Gathers and scatters are padded to powers of two (with the padding page 0): a few
    compiled shapes instead of one per page count."""
    return max(8, 1 << (n - 1).bit_length())


class PoolMover:
    """Pages between the device pool and host arrays. A gather is a jitted read of the pool
    (the next donated step runs after it on the device's stream, so it reads what the steps
    before it wrote), followed by a separate ``device_put`` to pinned host memory on a GPU:
    measured on an H200 that overlaps the next step, where a jit writing host memory
    directly serialises with it. A scatter is a jitted, donated update of the pool in place
    (its addresses, registered with NIXL, never change)."""

    def __init__(self, pool: KVPool):
        self.pool = pool
        self._ptrs = pool.buffer_pointers()
        self._gather = jax.jit(lambda k, v, idx: (gather_pages(k, idx), gather_pages(v, idx)))
        self._scatter = jax.jit(lambda k, v, idx, sk, sv: (scatter_pages(k, idx, sk), scatter_pages(v, idx, sv)),
                                donate_argnums=(0, 1))
        dev = pool.k.devices().pop()
        kinds = {m.kind for m in dev.addressable_memories()} if dev.platform == "gpu" else set()
        self._host = pool.k.sharding.with_memory_kind("pinned_host") if "pinned_host" in kinds else None
        self._dev = pool.k.sharding

    def warm(self, num_pages: int) -> None:
        """Copy ``num_pages`` padding pages to host once, at start-up: pinned host memory
        grows by seconds per GB the first time (measured on an H200), so serving never pays it."""
        jax.block_until_ready(self.gather([0] * num_pages))

    def gather(self, pages: Sequence[int]) -> tuple[jax.Array, jax.Array]:
        """Start copying ``pages`` (every layer) to host memory; returns ([n', L, S, KV, Dh],) * 2
        arrays (n' >= n, padded) that are ready once the copy has landed."""
        idx = np.zeros(_bucket(len(pages)), np.int32)
        idx[:len(pages)] = pages
        k, v = self._gather(self.pool.k, self.pool.v, idx)
        if self._host is not None:
            k, v = jax.device_put((k, v), self._host)
        return k, v

    def scatter(self, pages: Sequence[int], k: np.ndarray, v: np.ndarray) -> None:
        """Write host rows ``k``/``v`` [>= n, L, S, KV, Dh] into device ``pages`` (dispatched:
        a step launched after reads them); rows past the bucket are padding (page 0)."""
        n, m = len(pages), _bucket(len(pages))
        idx = np.zeros(m, np.int32)
        idx[:n] = pages
        if k.shape[0] != m:
            take = np.minimum(np.arange(m), n - 1)
            k, v = k[take], v[take]
        sk, sv = jax.device_put((k, v), self._dev)
        self.pool.k, self.pool.v = self._scatter(self.pool.k, self.pool.v, idx, sk, sv)
        assert self.pool.buffer_pointers() == self._ptrs, "KV pool moved: donation failed"
        return sk, sv

    def load(self, pages: Sequence[int], host: "HostTier", slots: Sequence[int]) -> None:
        """Host slots -> device ``pages``: one gather into a (pinned, reused) batch, one DMA,
        one donated scatter. Returns once the batch is on the device (it may be reused)."""
        k, v = host.take(slots, _bucket(len(pages)))
        jax.block_until_ready(self.scatter(pages, k, v))


def _copy_ready(arrays) -> bool:
    """Whether a device -> host copy has landed (tests delay it by replacing this)."""
    return all(a.is_ready() for a in arrays)


@dataclasses.dataclass(eq=False)
class Copy:
    """A copy in flight. ``kind``: d2h (device pages -> host slots; holds ``node``'s tree
    lock until observed complete) or h2f (host slots, pinned, -> file slots)."""

    kind: str
    keys: list[bytes]
    dst: list[tuple[int, int]]  # (slot, generation) in the destination tier
    src: list[int]  # device pages (d2h) or host slots (h2f)
    nbytes: int
    arrays: tuple = ()  # d2h: the host arrays being filled
    handle: object = None  # h2f: the NIXL request
    crcs: list[int] = dataclasses.field(default_factory=list)
    node: object = None  # d2h: the tree node whose lock pins ``src``
    chain: list = dataclasses.field(default_factory=list)  # keys of the prefix before ``keys``


def _pinned_torch_ok() -> bool:
    """Page-locked host memory is available (torch with CUDA): a device_put from it runs at
    DMA speed (49.5 GiB/s on an H200, measured: scripts/gpu/probe_host_copies.py) where one
    from pageable numpy ran at 6.6 GiB/s."""
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class HostTier:
    """Host memory for ``num_slots`` pages: K and V [H, L, S, KV, Dh], allocated and touched
    at start-up (growing host memory while serving costs seconds per GB). ``pinned``: the
    buffers are page-locked (torch's pinned allocator) and slot gathers and stores run on
    torch's threads; ``k``/``v`` are numpy views either way (what NIXL registers)."""

    def __init__(self, layout: PoolLayout, num_slots: int, pinned: bool = False):
        self.slots = SlotPool(num_slots, "host")
        self.shape = (num_slots,) + layout.shape[1:]
        self.dtype = jnp.dtype(layout.dtype)
        self.pinned = pinned
        self._staging: dict[int, tuple] = {}  # rows -> pinned (k, v) batches for loads
        if pinned:
            self._tk, self._tv = (self._torch_empty(self.shape) for _ in range(2))
            self.k, self.v = self._np(self._tk), self._np(self._tv)
        else:
            self.k, self.v = np.empty(self.shape, self.dtype), np.empty(self.shape, self.dtype)
            self.k.fill(0)
            self.v.fill(0)
        self.slot_bytes = self.k[0].nbytes  # one buffer's share of one page

    def _torch_empty(self, shape):
        import torch

        t = torch.empty(shape, dtype=getattr(torch, {2: "int16", 4: "int32", 1: "int8"}[self.dtype.itemsize]),
                        pin_memory=True)
        t.zero_()
        return t

    def _np(self, t) -> np.ndarray:
        return t.numpy().view(self.dtype)

    def _t(self, a: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(a).view(self._np_int()))

    def _np_int(self):
        return {2: np.int16, 4: np.int32, 1: np.int8}[self.dtype.itemsize]

    def take(self, slots: Sequence[int], rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The pages of ``slots`` gathered into a batch of ``rows`` >= len(slots) rows (the
        padding rows repeat the first slot). Pinned: into a reused pinned batch (valid until
        the next ``take`` of that size)."""
        src = np.full(rows, slots[0], np.int64)
        src[:len(slots)] = slots
        if not self.pinned:
            return self.k[src], self.v[src]
        import torch

        if rows not in self._staging:
            self._staging[rows] = tuple(self._torch_empty((rows,) + self.shape[1:]) for _ in range(2))
        sk, sv = self._staging[rows]
        idx = torch.from_numpy(src)
        torch.index_select(self._tk, 0, idx, out=sk)
        torch.index_select(self._tv, 0, idx, out=sv)
        return self._np(sk), self._np(sv)

    def put(self, slots: Sequence[int], k: np.ndarray, v: np.ndarray) -> None:
        """Store rows ``k[i]``/``v[i]`` into ``slots[i]``."""
        if not slots:
            return
        if not self.pinned:
            self.k[slots], self.v[slots] = k[:len(slots)], v[:len(slots)]
            return
        import torch

        idx = torch.as_tensor(np.asarray(slots, np.int64))
        with warnings.catch_warnings():  # (a device array's host view is read-only; we only read it)
            warnings.simplefilter("ignore")
            self._tk.index_copy_(0, idx, self._t(k[:len(slots)]))
            self._tv.index_copy_(0, idx, self._t(v[:len(slots)]))

    def crc(self, slot: int) -> int:
        return zlib.crc32(self.v[slot].view(np.uint8), zlib.crc32(self.k[slot].view(np.uint8)))


class FileTier:
    """Pages on local disk: one preallocated file of fixed slots (K then V of one page per
    slot) moved to and from the host tier by NIXL's POSIX plugin, an append-only index
    (``put <key> <slot> <crc>`` / ``del <slot>``) replayed at start-up, and a lock file so
    that one worker at a time owns the directory. A header (``meta.json``) records what the
    slots hold (seed, layout, slot count): another model's or layout's directory starts empty."""

    def __init__(self, path: str, num_slots: int, host: HostTier, seed: bytes, layout: PoolLayout,
                 agent_name: str = ""):
        os.makedirs(path, exist_ok=True)
        self.path = path
        self._lock = open(os.path.join(path, "lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise RuntimeError(f"cache.storage_path={path!r} is in use by another worker (one worker "
                               "per storage directory)") from None
        self.host = host
        self.slots = SlotPool(num_slots, "storage")
        self.slot_bytes = 2 * host.slot_bytes
        meta = {"seed": seed.hex(), "layout": [layout.num_layers, layout.page_size, layout.num_kv_heads,
                                               layout.head_dim, layout.dtype, layout.order],
                "num_slots": num_slots, "slot_bytes": self.slot_bytes}
        self.crc: list[int] = [0] * num_slots
        data, index, meta_path = (os.path.join(path, f) for f in ("pages.bin", "index.log", "meta.json"))
        self.index_path = index
        same = os.path.exists(meta_path) and _read_json(meta_path) == meta
        if not same:  # new, or another model / layout / size: start empty
            for f in (data, index):
                if os.path.exists(f):
                    os.remove(f)
        self.fd = os.open(data, os.O_RDWR | os.O_CREAT, 0o644)
        size = num_slots * self.slot_bytes
        if os.fstat(self.fd).st_size < size:
            os.posix_fallocate(self.fd, 0, size)
        if not same:
            with open(meta_path + ".tmp", "w") as f:
                json.dump(meta, f)
            os.replace(meta_path + ".tmp", meta_path)
        self.restored = self._replay() if same else 0
        from toolkit.disagg.nixl_backend import _nixl_api

        api = _nixl_api()
        self.agent = api.nixl_agent(agent_name or f"kv-storage-{os.getpid()}-{id(self)}",
                                    api.nixl_agent_config(enable_prog_thread=False, backends=[]))
        self.agent.create_backend("POSIX", {})
        self._reg = [self.agent.register_memory([(a.ctypes.data, a.nbytes, 0, "")], "DRAM")
                     for a in (host.k, host.v)]
        self._freg = self.agent.register_memory([(0, size, self.fd, "")], "FILE")

    def _replay(self) -> int:
        """The index at start-up: the last ``put`` of each slot not followed by a ``del``; a
        torn last line (a crash mid-append) is ignored."""
        if not os.path.exists(self.index_path):
            return 0
        live: dict[int, tuple[bytes, int]] = {}
        with open(self.index_path) as f:
            for line in f:
                parts = line.split()
                try:
                    if parts[0] == "put" and len(parts) == 4:
                        live[int(parts[2])] = (bytes.fromhex(parts[1]), int(parts[3]))
                    elif parts[0] == "del" and len(parts) == 2:
                        live.pop(int(parts[1]), None)
                except (ValueError, IndexError):
                    continue
        seen = set()
        for slot, (key, crc) in sorted(live.items()):
            if 0 <= slot < self.slots.num_slots and key not in seen:
                seen.add(key)
                self.slots.restore(key, slot)
                self.crc[slot] = crc
        return len(seen)

    def journal(self, lines: list[str]) -> None:
        """Append to the index (raises OSError, e.g. ENOSPC: the caller turns storage off)."""
        with open(self.index_path, "a") as f:
            f.write("".join(lines))
            f.flush()

    def _descs(self, host_slots: Sequence[int], file_slots: Sequence[int]):
        H, B = self.host.slot_bytes, self.slot_bytes
        local, remote = [], []
        for h, s in zip(host_slots, file_slots):
            for buf, off in ((self.host.k, 0), (self.host.v, H)):
                local.append((buf.ctypes.data + h * H, H, 0))
                remote.append((s * B + off, H, self.fd))
        return self.agent.get_xfer_descs(local, "DRAM"), self.agent.get_xfer_descs(remote, "FILE")

    def post(self, op: str, host_slots: Sequence[int], file_slots: Sequence[int]):
        """Start a WRITE (host -> file) or READ (file -> host); returns the NIXL request."""
        local, remote = self._descs(host_slots, file_slots)
        h = self.agent.initialize_xfer(op, local, remote, self.agent.name)
        if self.agent.transfer(h) == "ERR":
            self.agent.release_xfer_handle(h)
            raise OSError(f"NIXL POSIX {op} failed to post")
        return h

    def state(self, handle) -> str:
        """DONE, ERR or PROC; an exception from NIXL is ERR."""
        try:
            s = self.agent.check_xfer_state(handle)
        except Exception as e:  # noqa: BLE001 - NIXL's errors share no base class
            log.error("storage transfer failed: %s", e)
            s = "ERR"
        if s in ("DONE", "ERR"):
            try:
                self.agent.release_xfer_handle(handle)
            except Exception:  # noqa: BLE001
                pass
        return s

    def wait(self, handle, timeout_s: float = 60.0) -> str:
        t0 = time.perf_counter()
        while (s := self.state(handle)) == "PROC":  # (polling drives the POSIX backend)
            if time.perf_counter() - t0 > timeout_s:
                return "ERR"
            time.sleep(0)  # let the server's other threads run
        return s

    def close(self) -> None:
        try:
            self.agent.deregister_memory(self._freg)
            for r in self._reg:
                self.agent.deregister_memory(r)
        except Exception:  # noqa: BLE001
            pass
        os.close(self.fd)
        self._lock.close()


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@dataclasses.dataclass
class TierStats:
    host_slots: int = 0
    host_used: int = 0
    storage_slots: int = 0
    storage_used: int = 0
    storage_on: bool = False
    copies_inflight: int = 0
    loaded_pages: dict = dataclasses.field(default_factory=lambda: {"host": 0, "storage": 0})
    offloaded_bytes: dict = dataclasses.field(default_factory=lambda: {"host": 0, "storage": 0})
    loaded_bytes: dict = dataclasses.field(default_factory=lambda: {"host": 0, "storage": 0})


class KVTiers:
    """The tiers below the device tree and every copy between them. The cache manager
    calls ``backup`` when pages enter its tree (and locks the node it names until the copy
    ends), ``poll`` every step (returns the copies that ended, whose locks it drops),
    ``lookup``/``load`` at a match, ``drain`` before it flushes or shuts down."""

    def __init__(self, mover: PoolMover, layout: PoolLayout, host_slots: int, seed: bytes,
                 storage_path: str = "", storage_slots: int = 0, pinned: bool | None = None):
        """pinned: page-locked host memory (None: when JAX runs on a GPU and torch can pin)."""
        if pinned is None:
            pinned = jax.devices()[0].platform == "gpu" and _pinned_torch_ok()
        self.mover = mover
        self.host = HostTier(layout, host_slots, pinned=pinned)
        self.page_bytes = 2 * self.host.slot_bytes  # K and V of one page, every layer
        self.storage: Optional[FileTier] = None
        if storage_path:
            self.storage = FileTier(storage_path, storage_slots, self.host, seed, layout)
            if self.storage.restored:
                log.info("storage %s: %d pages from an earlier run", storage_path, self.storage.restored)
        self.inflight: list[Copy] = []
        self.st = TierStats()

    # ---- counts -----------------------------------------------------------------------

    def stats(self) -> TierStats:
        s = self.st
        s.host_slots, s.host_used = self.host.slots.num_slots, self.host.slots.num_used
        if self.storage is not None:
            s.storage_slots, s.storage_used = self.storage.slots.num_slots, self.storage.slots.num_used
        s.storage_on = self.storage is not None
        s.copies_inflight = len(self.inflight)
        return dataclasses.replace(s, loaded_pages=dict(s.loaded_pages), offloaded_bytes=dict(s.offloaded_bytes),
                                   loaded_bytes=dict(s.loaded_bytes))

    # ---- device -> host -> file ---------------------------------------------------------

    def backup(self, pages: Sequence[int], keys: Sequence[bytes], chain: Sequence[bytes] = ()) -> Optional[Copy]:
        """Start copying the device ``pages`` whose ``keys`` the host tier lacks; returns the
        copy (the caller pins ``pages`` until ``poll`` returns it) or None when there is
        nothing to copy or no host slot to copy into. ``chain``: the keys of the pages before
        ``pages`` in their prefix, kept more recent than these (``touch_chain``)."""
        hs, whole = self.host.slots, list(chain) + list(keys)
        hs.touch_chain(whole)
        want = [(p, k) for p, k in zip(pages, keys) if not hs.has(k)]
        while want and not hs.can_allocate(len(want)):
            want.pop()  # the tier is full of pages being read or written: copy what fits
        if not want:
            return None
        src, keys = [p for p, _ in want], [k for _, k in want]
        c = Copy("d2h", keys, hs.allocate(keys), src, len(src) * self.page_bytes, arrays=self.mover.gather(src),
                 chain=whole)
        self.inflight.append(c)
        return c

    def poll(self, block: bool = False) -> list[Copy]:
        """Observe the copies in flight; returns the device -> host copies that ended (their
        device pages may be unpinned now). ``block``: wait for every one of them."""
        ended, current, self.inflight = [], self.inflight, []
        for c in current:  # (an ending d2h copy may start an h2f one: it joins self.inflight)
            if c.kind == "d2h":
                if block or _copy_ready(c.arrays):
                    self._end_d2h(c)
                    ended.append(c)
                else:
                    self.inflight.append(c)
            else:
                s = self.storage.wait(c.handle) if block else self.storage.state(c.handle)
                if s == "PROC":
                    self.inflight.append(c)
                else:
                    self._end_h2f(c, s == "DONE")
        self._close_failed_storage()
        return ended

    def _end_d2h(self, c: Copy) -> None:
        k, v = (np.asarray(a) for a in c.arrays)
        hs, published = self.host.slots, []
        live = [i for i, (slot, gen) in enumerate(c.dst) if hs.gen[slot] == gen]  # (not invalidated meanwhile)
        if live == list(range(len(live))):
            self.host.put([c.dst[i][0] for i in live], k, v)
        else:
            self.host.put([c.dst[i][0] for i in live], k[live], v[live])
        for i in reversed(range(len(c.dst))):  # (the chain's end least recent: evicted first)
            slot, gen = c.dst[i]
            if hs.end_write(slot, gen, ok=True):
                published.insert(0, (c.keys[i], slot))
        hs.touch_chain(c.chain)
        self.st.offloaded_bytes["host"] += len(published) * self.page_bytes
        if self.storage is not None and self._storage_error is None and published:
            self._write_through(published)

    def _write_through(self, published: list[tuple[bytes, int]]) -> None:
        fs = self.storage.slots
        want = [(k, h) for k, h in published if not fs.has(k)]
        while want and not fs.can_allocate(len(want)):
            want.pop()
        if not want:
            return
        keys, hslots = [k for k, _ in want], [h for _, h in want]
        dst = fs.allocate(keys)
        for h in hslots:
            self.host.slots.pin(h)
        c = Copy("h2f", keys, dst, hslots, len(keys) * self.page_bytes, crcs=[self.host.crc(h) for h in hslots])
        try:
            c.handle = self.storage.post("WRITE", hslots, [s for s, _ in dst])
        except Exception as e:  # noqa: BLE001 - NIXL's errors share no base class
            self._fail_storage(e)
            self._end_h2f(c, False)
            return
        self.inflight.append(c)

    def _end_h2f(self, c: Copy, ok: bool) -> None:
        """A host -> file copy is observed DONE (``ok``) or ERR: its host slots are unpinned,
        its file slots published (and journaled) or freed."""
        for h in c.src:
            self.host.slots.unpin(h)
        fs, lines = self.storage.slots, []
        for key, (slot, gen), crc in reversed(list(zip(c.keys, c.dst, c.crcs))):  # (as _end_d2h)
            if fs.end_write(slot, gen, ok):
                self.storage.crc[slot] = crc
                lines.append(f"put {key.hex()} {slot} {crc}\n")
        if not ok:
            return self._fail_storage("a NIXL POSIX write ended in ERR")
        try:
            self.storage.journal(lines)
        except OSError as e:
            return self._fail_storage(e)
        self.st.offloaded_bytes["storage"] += len(lines) * self.page_bytes

    _storage_error: object = None

    def _fail_storage(self, error) -> None:
        """A storage write or read failed (a full disk, an I/O error): storage turns off for
        the rest of this run, logged once; requests keep being served from device and host.
        It closes at the end of the current poll (``_close_failed_storage``), once NIXL has
        let go of every buffer."""
        if self.storage is not None and self._storage_error is None:
            log.error("KV storage at %s turned off: %s", self.storage.path, error)
            self._storage_error = error

    def _close_failed_storage(self) -> None:
        if self.storage is None or self._storage_error is None:
            return
        for c in [c for c in self.inflight if c.kind == "h2f"]:
            self.storage.wait(c.handle)
            self._end_h2f(c, False)
        self.inflight = [c for c in self.inflight if c.kind != "h2f"]
        self.storage.slots.invalidate()
        self.storage.close()
        self.storage = None

    # ---- lower tiers -> device -----------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> list[tuple[str, int]]:
        """The longest run of ``keys`` (a chain, from its start) held in host or storage:
        one (tier, slot) per key found."""
        out = []
        for key in keys:
            slot = self.host.slots.index.get(key)
            if slot is not None:
                out.append(("host", slot))
                continue
            slot = self.storage.slots.index.get(key) if self.storage is not None else None
            if slot is None:
                break
            out.append(("storage", slot))
        self.host.slots.touch_chain(keys[:len(out)])
        if self.storage is not None:
            self.storage.slots.touch_chain(keys[:len(out)])
        return out

    def load(self, keys: Sequence[bytes], hits: Sequence[tuple[str, int]], pages: Sequence[int]) -> int:
        """Load the pages ``lookup`` found into device ``pages`` (one each, in order): storage
        pages are read into host slots first (and checked against their CRC), then every page
        is written to the device (dispatched before the step that reads it). Returns how
        many pages, from the first, were loaded: a page that fails its checksum, or a read
        that fails, ends the run there (the rest is recomputed)."""
        hslots = self._read_storage(keys, hits)
        n = len(hslots)
        if n:
            self.mover.load(pages[:n], self.host, hslots)
            self.st.loaded_bytes["host"] += n * self.page_bytes
            self.st.loaded_pages["host"] += sum(1 for t, _ in hits[:n] if t == "host")
            self.st.loaded_pages["storage"] += sum(1 for t, _ in hits[:n] if t == "storage")
        return n

    def _read_storage(self, keys, hits) -> list[int]:
        """The host slots of ``hits``, in order, reading the storage hits into new host slots;
        the run stops at the first page that cannot be read or fails its CRC."""
        todo = [i for i, (t, _) in enumerate(hits) if t == "storage"]
        if not todo:
            return [s for _, s in hits]
        hs, fs = self.host.slots, self.storage.slots
        host_hits = [s for t, s in hits if t == "host"]
        for s in host_hits:  # allocating host slots below must not evict the host hits
            hs.pin(s)
        while todo and not hs.can_allocate(len(todo)):
            todo.pop()
        dst = dict(zip(todo, hs.allocate([keys[i] for i in todo])))
        for i in todo:
            fs.pin(hits[i][1])
        try:
            h = self.storage.post("READ", [dst[i][0] for i in todo], [hits[i][1] for i in todo]) if todo else None
            ok = h is None or self.storage.wait(h) == "DONE"
        except Exception as e:  # noqa: BLE001 - NIXL's errors share no base class
            self._fail_storage(e)
            ok = False
        good = set()
        for i in todo:
            fslot, (slot, gen) = hits[i][1], dst[i]
            fs.unpin(fslot)
            fine = ok and self.host.crc(slot) == self.storage.crc[fslot]
            if ok and not fine:
                log.error("storage page %s (file slot %d) fails its checksum: dropped, recomputed",
                          keys[i].hex()[:12], fslot)
                if fs.drop(keys[i]) is not None:
                    self._journal_del(fslot)
            if hs.end_write(slot, gen, fine):
                good.add(i)
        for s in host_hits:
            hs.unpin(s)
        self.st.loaded_bytes["storage"] += len(good) * self.page_bytes
        self._close_failed_storage()
        out = []
        for i, (t, s) in enumerate(hits):
            if t == "host":
                out.append(s)
            elif i in good:
                out.append(dst[i][0])
            else:
                break
        return out

    def _journal_del(self, slot: int) -> None:
        try:
            self.storage.journal([f"del {slot}\n"])
        except OSError as e:
            self._fail_storage(e)

    def warm(self, max_pages: int) -> int:
        """Compile the gather and the load for every padded size up to ``max_pages`` (engine
        warm-up: the first copy or hit then compiles nothing inside a request's TTFT). They
        read and write only the padding page 0. Returns how many sizes."""
        m, sizes = 8, 0
        while True:
            jax.block_until_ready(self.mover.gather([0] * m))
            self.mover.load([0] * m, self.host, [0] * m)
            sizes += 1
            if m >= max_pages:
                return sizes
            m *= 2

    # ---- shutdown -------------------------------------------------------------------------

    def drain(self) -> list[Copy]:
        """Wait for every copy in flight (before a flush or shutdown); returns the device ->
        host ones (whose device pages the caller unpins)."""
        ended = []
        while self.inflight:
            ended += self.poll(block=True)
        return ended

    def close(self) -> None:
        self.drain()
        if self.storage is not None:
            self.storage.close()
            self.storage = None

    def check(self) -> None:
        self.host.slots.check()
        if self.storage is not None:
            self.storage.slots.check()
        reading = collections.Counter(h for c in self.inflight if c.kind == "h2f" for h in c.src)
        for s in range(self.host.slots.num_slots):
            assert self.host.slots.readers[s] == reading.get(s, 0), f"host slot {s}: readers vs copies"
        for c in self.inflight:
            tier = self.host.slots if c.kind == "d2h" else self.storage.slots
            for slot, gen in c.dst:
                assert tier.state[slot] == WRITING, f"{c.kind} copy into a {tier.state[slot]} slot"


def slots_for(gb: float, page_bytes: int) -> int:
    """Pages (K and V of every layer) that ``gb`` GiB holds."""
    return int(gb * GIB) // page_bytes
