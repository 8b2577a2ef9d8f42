"""NIXL transfer backend: one-sided WRITEs of KV pages and aux records into a peer's pool.

Choices
-------
Descriptor granularity
    One descriptor per (buffer, page): ``base + page * layout.page_bytes``, ``page_bytes``
    long (one page of every layer: the pool is page-major, ``toolkit.cache.pool``), in
    buffer-major order (K pages.., V pages..), followed by one descriptor per aux slot
    (``AUX_DTYPE.itemsize`` each). A page is two descriptors whatever the number of layers
    (a layer-major pool cost 2*L: at ~7 us per scattered descriptor on an H200 that capped
    scattered pages at 0.004 of copy speed). Every buffer is registered once, by raw
    address, at construction; the local list is prepared once and each peer's list once at
    ``connect``. A write only computes index arrays (numpy, no per-page Python work): for
    buffer b and page pair (src, dst) the local index is ``b*P_local + src`` and the remote
    one ``b*P_remote + dst``; so the two pools may have different ``num_pages``. NIXL merges
    index-adjacent descriptors that are also address-contiguous, so runs of consecutive
    pages become one UCX put (of every layer at once).

How notifications piggyback
    The notification rides on the transfer request (``make_prepped_xfer(..., notif_msg)``);
    NIXL/UCX delivers it to the target only after that request's data has landed. When the
    pool list and the aux list can be one list on both sides (both pools in DRAM), pages and
    aux go in a single request carrying the notification. A prepared list holds one memory
    type only, so when either pool is VRAM the pages and the aux slot are two requests: the
    pages (no notification) first and, once the initiator sees them DONE (UCX completes a put
    only after a remote flush), the aux record with the notification; ``status`` drives that
    second post. A write with no pages and no aux has nothing to carry the message, and NIXL
    rejects empty requests, so it is sent with ``send_notif`` (a standalone notification) and
    its handle is DONE at once.

Error mapping
    NIXL reports failures as exceptions from its bindings (``nixlRemoteDisconnectError``,
    ``nixlBackendError``, ...: they share no base class beyond ``Exception``) or as an "ERR"
    state. ``write`` raises ``TransferError`` when a request cannot be created or posted
    (unknown peer, dead peer noticed at post time) and ``ValueError`` for bad arguments;
    ``status`` never raises: an exception or "ERR" from ``check_xfer_state`` is
    ``XferStatus.ERR`` and is sticky. ``release``/``disconnect``/``close`` swallow (and log)
    NIXL errors so that cleanup after a peer died always completes.

Progress
    NIXL's Python API starts each agent's progress thread with a 0 us pause: it spins a whole
    core even when idle (a prefill+decode pair in one process takes both cores of a small
    machine). We keep the thread, so transfers advance while either engine is busy in a step,
    but make it pause ``progress_delay_us`` (the thread polls the UCX worker's event fd with
    that timeout, rounded up to 1 ms, so it still wakes at once on traffic: ~2% of a core
    idle, 24 MiB writes done in a few ms over loopback). Without any thread, a write
    completes only when the target next calls ``notifications()``. The initiator must still
    poll ``status`` until DONE or ERR (that drives the second stage of a split write). Not
    thread-safe: one thread per backend.

Remote death (UCX over loopback, measured): writes posted after the peer died raise
``nixlRemoteDisconnectError`` at post time (-> TransferError); writes in flight when it died
end DONE (NIXL's UCX backend flushes the endpoint before DONE, so those had landed) or ERR
within milliseconds. A peer that hangs (rather than dies) leaves transfers PROC: callers need
their own timeout. Reconnecting to a restarted peer that reuses the dead one's name works
(``connect`` replaces the old incarnation).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import threading
from typing import Any, Optional

import numpy as np

from toolkit.cache.state_pool import StateLayout
from toolkit.disagg.transfer import (AUX_DTYPE, AuxBuffer, LayoutMismatch, PoolLayout, TransferBackend,
                                     TransferError, XferStatus, check_state_layouts)

log = logging.getLogger(__name__)

_LOCAL = "NIXL_INIT_AGENT"


def _nixl_api():
    """The ``nixl._api`` module: through the ``nixl`` meta package when installed, else the
    CUDA-variant wheel directly (``pip install nixl-cu12`` ships only ``nixl_cu12``)."""
    errors = []
    for name in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            api = __import__(name, fromlist=["nixl_agent"])
        except ImportError as e:  # noqa: PERF203
            errors.append(f"{name}: {e}")
            continue
        _quiet_stdout()
        return api
    raise ImportError("NIXL is not installed (pip install nixl-cu12): " + "; ".join(errors))


def _quiet_stdout() -> None:
    """NIXL's Python logger writes to stdout; scripted jobs keep stdout for their output,
    so its records go to stderr at WARNING and above."""
    import sys

    nl = logging.getLogger("nixl")
    for h in list(nl.handlers):
        if getattr(h, "stream", None) is sys.stdout:
            h.setStream(sys.stderr)
    nl.setLevel(logging.WARNING)


_AGENT_LOCK = threading.Lock()


def _make_agent(api, name: str, backends: list[str], progress_delay_us: Optional[int],
                params: Optional[dict] = None):
    """A ``nixl_agent`` whose progress thread sleeps ``progress_delay_us`` between passes.

    The Python API hard-codes ``pthrDelay = 0``: its progress thread spins, one full core per
    agent even when idle. Its config object is built inside ``nixl_agent.__init__``, so the
    bindings' config class is swapped, for the duration of the call, for a subclass that
    keeps our delay. None: no progress thread (transfers then advance only while the
    initiator polls ``status`` and the target polls ``notifications``)."""
    if params:  # backends created below, with their init parameters
        agent = _make_agent(api, name, [], progress_delay_us)
        for b in backends:
            agent.create_backend(b, {k: str(v) for k, v in params.get(b, {}).items()})
        return agent
    cfg = api.nixl_agent_config(enable_prog_thread=progress_delay_us is not None, backends=backends)
    bind = getattr(api, "nixlBind", None)
    if not progress_delay_us or bind is None or not hasattr(bind, "nixlAgentConfig"):
        return api.nixl_agent(name, cfg)
    base = bind.nixlAgentConfig

    class _Config(base):
        def __setattr__(self, key, value):
            super().__setattr__(key, int(progress_delay_us) if key == "pthrDelay" else value)

    with _AGENT_LOCK:
        bind.nixlAgentConfig = _Config
        try:
            return api.nixl_agent(name, cfg)
        finally:
            bind.nixlAgentConfig = base


def nixl_available() -> bool:
    try:
        _nixl_api()
        return True
    except ImportError:
        return False


def _descs(lay: PoolLayout) -> np.ndarray:
    """Nx3 (address, length, device) rows, buffer-major, then page."""
    offs = np.arange(lay.num_pages, dtype=np.uint64) * np.uint64(lay.page_bytes)
    rows = np.empty((len(lay.addresses) * offs.size, 3), np.uint64)
    rows[:, 0] = (np.asarray(lay.addresses, np.uint64)[:, None] + offs[None, :]).reshape(-1)
    rows[:, 1] = lay.page_bytes
    rows[:, 2] = lay.device_id
    return rows


def _state_descs(st: Optional[StateLayout]) -> np.ndarray:
    """Nx3 rows of a state pool, buffer-major (conv, ssm), then slot: one slot of every
    Mamba2 layer is one contiguous piece of each buffer. Empty without state."""
    if st is None:
        return np.empty((0, 3), np.uint64)
    parts = []
    for addr, size in zip(st.addresses, st.slot_bytes):
        rows = np.empty((st.num_slots, 3), np.uint64)
        rows[:, 0] = np.uint64(addr) + np.arange(st.num_slots, dtype=np.uint64) * np.uint64(size)
        rows[:, 1] = size
        rows[:, 2] = st.device_id
        parts.append(rows)
    return np.concatenate(parts)


def _pool_descs(lay: PoolLayout, st: Optional[StateLayout]) -> np.ndarray:
    """The pool list's rows: the pages (none when the pool has no layer), then the state slots."""
    pages = _descs(lay) if lay.buffer_bytes else np.empty((0, 3), np.uint64)
    return np.concatenate([pages, _state_descs(st)])


def _aux_descs(address: int, slots: int) -> np.ndarray:
    rows = np.empty((slots, 3), np.uint64)
    rows[:, 0] = np.uint64(address) + np.arange(slots, dtype=np.uint64) * np.uint64(AUX_DTYPE.itemsize)
    rows[:, 1] = AUX_DTYPE.itemsize
    rows[:, 2] = 0
    return rows


@dataclasses.dataclass
class _Peer:
    name: str
    agent_md: bytes
    layout: PoolLayout
    aux_slots: int
    pool_list: Any  # prepared remote list of the peer's pages, state slots (and aux slots when combined)
    aux_list: Any  # the same handle when combined, else a DRAM list of the aux slots
    aux_base: int  # index of aux slot 0 in aux_list
    state: Optional[StateLayout] = None  # the peer's state pool (None: no state)
    state_base: int = 0  # index of (conv, slot 0) in pool_list


@dataclasses.dataclass(eq=False)
class _Stage:
    local: Any
    local_idx: np.ndarray
    remote: Any
    remote_idx: np.ndarray
    notif: bytes
    handle: Any = None


@dataclasses.dataclass(eq=False)
class NixlXfer:
    """Handle returned by ``NixlBackend.write``: stages posted one after the other."""

    peer: str
    stages: list[_Stage]
    cur: int = 0
    state: XferStatus = XferStatus.PROC
    error: Optional[str] = None


class NixlBackend(TransferBackend):
    name = "nixl"

    def __init__(self, agent_name: str, layout: PoolLayout, aux: AuxBuffer, backends=("UCX",), *,
                 progress_delay_us: Optional[int] = 100, split_aux: Optional[bool] = None,
                 backend_params: Optional[dict] = None, state: Optional[StateLayout] = None):
        """``layout``: the placed layout of this side's pool (``KVPool.describe()``).
        ``progress_delay_us``: pause of NIXL's progress thread between passes (0: NIXL's
        own busy-spinning thread; None: no thread, progress only inside ``status`` and
        ``notifications``). ``split_aux``: post pages and aux as two requests even when one
        would do (both pools in DRAM); None = only when needed. Exists so CPU tests cover the
        VRAM path. ``backend_params``: init parameters per backend, e.g. ``{"UCX":
        {"num_threads": 8, "split_batch_size": 64}}`` (UCX: a write of at least
        split_batch_size descriptors is split across num_threads worker threads).
        ``state``: the placed layout of this side's recurrent-state pool (a hybrid model;
        ``StatePool.describe()``), registered beside the KV pool in the same memory type;
        its descriptors follow the pages' in the same list, so a room's last transfer moves
        pages, state slot and aux record together."""
        api = _nixl_api()
        if layout.mem_type not in ("DRAM", "VRAM"):
            raise ValueError(f"mem_type must be DRAM or VRAM, not {layout.mem_type!r}")
        if not layout.addresses:
            raise ValueError("the pool layout is not placed (no buffer addresses): pass KVPool.describe()")
        self.agent_name = agent_name
        self.layout = layout
        self.state = state
        if state is not None and (state.mem_type != layout.mem_type or not state.addresses):
            raise ValueError("the state pool must be placed, in the KV pool's memory type")
        self.aux = aux
        self._backends = list(backends)
        self._force_split = bool(split_aux)
        self._agent = _make_agent(api, agent_name, self._backends, progress_delay_us, backend_params)
        missing = [b for b in self._backends if b not in self._agent.backends]
        if missing:
            raise TransferError(f"NIXL backend(s) {missing} could not be created "
                                f"(plugins available: {self._agent.get_plugin_list()})")
        self._peers: dict[str, _Peer] = {}
        self._regs: list[Any] = []
        self._lists: list[Any] = []
        self._closed = False

        self._aux_slots = len(aux.records)
        pool_len = layout.buffer_bytes
        try:
            regions = [(int(a), pool_len, layout.device_id, "") for a in layout.addresses] if pool_len else []
            if state is not None:  # (a Mamba2 model's KV pool has no layer: state only)
                regions += [(int(a), state.num_slots * n, state.device_id, "")
                            for a, n in zip(state.addresses, state.slot_bytes)]
            if regions:
                self._regs.append(self._agent.register_memory(regions, layout.mem_type, self._backends))
            self._regs.append(self._agent.register_memory(
                [(aux.address, aux.nbytes, 0, "")], "DRAM", self._backends))
            pages = _pool_descs(layout, state)
            self._lstate_base = len(_descs(layout)) if pool_len else 0
            auxd = _aux_descs(aux.address, self._aux_slots)
            if layout.mem_type == "DRAM":
                self._lpool = self._prep(_LOCAL, np.concatenate([pages, auxd]), "DRAM")
                self._laux, self._laux_base = self._lpool, len(pages)
            else:
                self._lpool = self._prep(_LOCAL, pages, layout.mem_type)
                self._laux, self._laux_base = self._prep(_LOCAL, auxd, "DRAM"), 0
        except Exception:
            self.close()
            raise

    def _prep(self, agent: str, rows: np.ndarray, mem_type: str):
        h = self._agent.prep_xfer_dlist(agent, rows, mem_type, self._backends)
        self._lists.append(h)
        return h

    # ---- handshake -------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {"backend": self.name, "agent": self.agent_name,
                "agent_metadata": base64.b64encode(self._agent.get_agent_metadata()).decode("ascii"),
                "layout": self.layout.to_json(), "aux_address": int(self.aux.address), "aux_slots": self._aux_slots,
                "aux_itemsize": AUX_DTYPE.itemsize,
                "state_layout": self.state.to_json() if self.state is not None else None}

    def connect(self, peer: dict[str, Any]) -> str:
        if peer.get("backend", self.name) != self.name:
            raise LayoutMismatch(f"transfer backend mismatch: {self.name!r} here and "
                                 f"{peer.get('backend')!r} on the peer")
        try:
            theirs = PoolLayout.from_json(peer["layout"])
            md = base64.b64decode(peer["agent_metadata"])
            name = str(peer["agent"])
            aux_address, aux_slots = int(peer["aux_address"]), int(peer["aux_slots"])
        except (KeyError, TypeError, ValueError) as e:
            raise TransferError(f"malformed NIXL handshake payload: {e!r}") from e
        self.layout.check_compatible(theirs)  # before NIXL learns anything about the peer
        their_state = check_state_layouts(self.state, peer.get("state_layout"))
        if peer.get("aux_itemsize", AUX_DTYPE.itemsize) != AUX_DTYPE.itemsize:
            raise LayoutMismatch(f"aux record size mismatch: {AUX_DTYPE.itemsize} here and "
                                 f"{peer['aux_itemsize']} on the peer")
        known = self._peers.get(name)
        if known is not None:
            if known.agent_md == md:
                return name
            self.disconnect(name)  # same name, new incarnation (peer restarted)

        try:
            added = self._agent.add_remote_agent(md)
        except Exception as e:
            raise TransferError(f"NIXL could not load the metadata of peer {name!r}: {e!r}") from e
        added = added.decode() if isinstance(added, bytes) else str(added)
        if added != name:
            _quiet(self._agent.remove_remote_agent, added)
            raise TransferError(f"peer metadata names agent {added!r}, handshake says {name!r}")
        lists: list[Any] = []
        try:
            pages = _pool_descs(theirs, their_state)
            state_base = len(_descs(theirs)) if theirs.buffer_bytes else 0
            auxd = _aux_descs(aux_address, aux_slots)
            if theirs.mem_type == "DRAM":
                pool_list = self._agent.prep_xfer_dlist(name, np.concatenate([pages, auxd]), "DRAM",
                                                        self._backends)
                lists.append(pool_list)
                aux_list, aux_base = pool_list, len(pages)
            else:
                pool_list = self._agent.prep_xfer_dlist(name, pages, theirs.mem_type, self._backends)
                lists.append(pool_list)
                aux_list = self._agent.prep_xfer_dlist(name, auxd, "DRAM", self._backends)
                lists.append(aux_list)
                aux_base = 0
        except Exception as e:
            for h in lists:
                _quiet(h.release)
            _quiet(self._agent.remove_remote_agent, name)
            raise TransferError(f"cannot prepare descriptors of peer {name!r}: {e!r}") from e
        self._peers[name] = _Peer(name, md, theirs, aux_slots, pool_list, aux_list, aux_base, their_state, state_base)
        return name

    # ---- initiator -------------------------------------------------------------------------

    def _page_indices(self, peer: _Peer, src_pages, dst_pages) -> tuple[np.ndarray, np.ndarray]:
        src = np.asarray(src_pages, np.int64).reshape(-1)
        dst = np.asarray(dst_pages, np.int64).reshape(-1)
        if src.size != dst.size:
            raise ValueError(f"{src.size} source pages but {dst.size} destination pages")
        if not self.layout.buffer_bytes:  # no attention layer: pages hold nothing to move
            return np.empty(0, np.int32), np.empty(0, np.int32)
        here, there = self.layout.num_pages, peer.layout.num_pages
        if src.size and (src.min() < 0 or src.max() >= here):
            raise ValueError(f"source page out of range [0, {here}): {src.tolist()}")
        if dst.size and (dst.min() < 0 or dst.max() >= there):
            raise ValueError(f"destination page out of range [0, {there}): {dst.tolist()}")
        bufs = np.arange(self.layout.num_buffers, dtype=np.int64)[:, None]
        local = (bufs * here + src[None, :]).reshape(-1)
        remote = (bufs * there + dst[None, :]).reshape(-1)
        return local.astype(np.int32), remote.astype(np.int32)

    def _state_indices(self, peer: _Peer, state: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of one state slot (conv, ssm) in the local and the peer's pool lists."""
        s, d = int(state[0]), int(state[1])
        if self.state is None or peer.state is None:
            raise ValueError("a state slot, but this model (or the peer's) has no state pool")
        if not (0 <= s < self.state.num_slots and 0 <= d < peer.state.num_slots):
            raise ValueError(f"state slots {state} out of range ({self.state.num_slots} here, "
                             f"{peer.state.num_slots} on the peer)")
        bufs = np.arange(2, dtype=np.int64)
        local = self._lstate_base + bufs * self.state.num_slots + s
        remote = peer.state_base + bufs * peer.state.num_slots + d
        return local.astype(np.int32), remote.astype(np.int32)

    def write(self, peer: str, src_pages: list[int], dst_pages: list[int],
              aux: Optional[tuple[int, int]], notif: bytes,
              state: Optional[tuple[int, int]] = None) -> NixlXfer:
        p = self._peers.get(peer)
        if p is None:
            raise TransferError(f"unknown peer {peer!r} (connect first)")
        if state is not None and aux is None:
            raise ValueError("a state slot moves only with the aux record (the last transfer)")
        notif = notif.encode() if isinstance(notif, str) else bytes(notif)
        lpage, rpage = self._page_indices(p, src_pages, dst_pages)
        if state is not None:  # same list, same memory type: the state rides with the pages
            ls, rs = self._state_indices(p, state)
            lpage, rpage = np.concatenate([lpage, ls]), np.concatenate([rpage, rs])
        stages: list[_Stage] = []
        if aux is not None:
            s, d = int(aux[0]), int(aux[1])
            if not (0 <= s < self._aux_slots and 0 <= d < p.aux_slots):
                raise ValueError(f"aux slots {aux} out of range "
                                 f"({self._aux_slots} here, {p.aux_slots} on the peer)")
            la = np.array([self._laux_base + s], np.int32)
            ra = np.array([p.aux_base + d], np.int32)
            one = self._laux is self._lpool and p.aux_list is p.pool_list and not self._force_split
            if one:
                stages.append(_Stage(self._lpool, np.concatenate([lpage, la]), p.pool_list,
                                     np.concatenate([rpage, ra]), notif))
            else:
                if lpage.size:
                    stages.append(_Stage(self._lpool, lpage, p.pool_list, rpage, b""))
                stages.append(_Stage(self._laux, la, p.aux_list, ra, notif))
        elif lpage.size:
            stages.append(_Stage(self._lpool, lpage, p.pool_list, rpage, notif))

        x = NixlXfer(peer, stages)
        if not stages:  # nothing to move: the notification goes alone
            try:
                self._agent.send_notif(peer, notif)
            except Exception as e:
                raise TransferError(f"notification to {peer!r} failed: {e!r}") from e
            x.state = XferStatus.DONE
            return x
        try:
            self._post(x)
        except Exception as e:
            self.release(x)
            raise TransferError(f"write to {peer!r} could not start: {e!r}") from e
        if x.state is XferStatus.ERR:
            self.release(x)
            raise TransferError(f"write to {peer!r} could not start: {x.error}")
        return x

    def _post(self, x: NixlXfer) -> None:
        """Create and post stage ``x.cur``; advance through stages that complete at once."""
        while True:
            st = x.stages[x.cur]
            st.handle = self._agent.make_prepped_xfer("WRITE", st.local, st.local_idx, st.remote, st.remote_idx,
                                                      st.notif, self._backends)
            state = self._agent.transfer(st.handle)
            if state == "ERR":
                x.state, x.error = XferStatus.ERR, "transfer() returned ERR"
                return
            if state == "PROC" or not self._advance(x):
                return

    def _advance(self, x: NixlXfer) -> bool:
        """The current stage is DONE: True if another stage is to be posted."""
        x.cur += 1
        if x.cur == len(x.stages):
            x.state = XferStatus.DONE
            return False
        return True

    def status(self, handle: NixlXfer) -> XferStatus:
        if handle.state is not XferStatus.PROC:
            return handle.state
        try:
            st = handle.stages[handle.cur]
            state = self._agent.check_xfer_state(st.handle)
            if state == "ERR":
                handle.state, handle.error = XferStatus.ERR, "check_xfer_state returned ERR"
            elif state == "DONE" and self._advance(handle):
                self._post(handle)
        except Exception as e:  # NIXL raises on e.g. remote disconnect
            handle.state, handle.error = XferStatus.ERR, repr(e)
            log.warning("NIXL transfer to %s failed: %r", handle.peer, e)
        return handle.state

    def release(self, handle: NixlXfer) -> None:
        for st in handle.stages:
            if st.handle is not None:
                _quiet(st.handle.release)
                st.handle = None

    # ---- target ----------------------------------------------------------------------------

    def notifications(self) -> list[bytes]:
        out: list[bytes] = []
        for msgs in self._agent.get_new_notifs().values():
            out.extend(bytes(m) for m in msgs)
        return out

    # ---- teardown --------------------------------------------------------------------------

    def disconnect(self, peer: str) -> None:
        p = self._peers.pop(peer, None)
        if p is None:
            return
        _quiet(p.pool_list.release)
        if p.aux_list is not p.pool_list:
            _quiet(p.aux_list.release)
        _quiet(self._agent.remove_remote_agent, peer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in list(self._peers):
            self.disconnect(name)
        for h in self._lists:
            _quiet(h.release)
        self._lists.clear()
        for r in self._regs:
            _quiet(self._agent.deregister_memory, r, self._backends)
        self._regs.clear()
        self._agent = None  # drops the C++ agent (and its UCX worker)

    @property
    def peers(self) -> list[str]:
        return list(self._peers)


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:
        log.debug("NIXL cleanup call %s failed: %r", getattr(fn, "__name__", fn), e)
