"""Transfer backends: move KV pages and the aux record from a prefill pool into a decode pool.

A backend is created on each side around that side's buffers:

    pools   the KV pool buffers (K and V), each [P, L, S, KV, Dh], one page of every layer
            contiguous (``toolkit.cache.pool.PoolLayout``, placed: the peers compare it at
            handshake); registered once (their addresses never move: they are donated
            through every jitted step)
    aux     an ``AuxBuffer``: a small host array of fixed-size records, one slot per room
    state   the recurrent-state pool of a hybrid model (``toolkit.cache.state_pool``: conv
            and SSM buffers, one slot of every Mamba2 layer contiguous in each), placed and
            registered like the KV pool; None for attention-only models. A room's slot
            moves in the same transfer as the aux record (the last), so decode's completion
            rule needs nothing more; a room has state exactly when decode's ``RoomMeta``
            lists a slot (``state_slots``: an empty list means "no state", never "wait")

The initiator (prefill) calls ``write`` for each finished chunk; the target
(decode) only registers, hands out its ``metadata()`` and reads
``notifications()``. A notification is delivered only after the data of the
transfer that carries it has landed.
"""

from __future__ import annotations

import abc
import enum
from typing import Any, Optional

import numpy as np

from toolkit.cache.holds import Holds
from toolkit.cache.pool import LayoutMismatch, PoolLayout  # noqa: F401 -- re-exported for backends
from toolkit.cache.state_pool import StateLayout

# One aux record: which room it belongs to (decode checks it against the slot's
# room to detect a slot mix-up), the first sampled token, its logprob, and an
# optional checksum of the room's transferred pages.
AUX_DTYPE = np.dtype([("room", "<i8"), ("token", "<i4"), ("logprob", "<f4"), ("checksum", "<u8"),
                      ("num_pages", "<i4"), ("pad", "<i4")])  # 32 bytes


class AuxBuffer:
    """Host records, one slot per in-flight room, and the manager of those slots: a free
    list, and holds for the slots of failed rooms the peer may still write (the last
    chunk carries the aux record), like the page manager's (``CacheManager.unreserve``)."""

    def __init__(self, num_slots: int):
        self.records = np.zeros(num_slots, AUX_DTYPE)
        self._free = list(range(num_slots - 1, -1, -1))
        self._held = Holds()  # owner -> slot of a failed room

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_held(self) -> int:
        return len(self._held)

    def hold(self, owner, slot: int, hold_s: float) -> None:
        """Keep ``slot`` out of use until ``end_hold(owner)`` or ``hold_s`` seconds pass."""
        self._held.hold(owner, slot, hold_s)

    def holds(self, owner) -> bool:
        return owner in self._held

    def end_hold(self, owner) -> None:
        slot = self._held.pop(owner)
        if slot is not None:
            self.free(slot)

    def expire_holds(self) -> None:
        for owner in self._held.expired():
            self.end_hold(owner)

    def allocate(self) -> int:
        assert self._free, "no free aux slot"
        slot = self._free.pop()
        self.records[slot] = np.zeros((), AUX_DTYPE)
        return slot

    def free(self, slot: int) -> None:
        assert slot not in self._free, f"aux slot {slot} freed twice"
        self._free.append(slot)

    @property
    def address(self) -> int:
        return self.records.ctypes.data

    @property
    def nbytes(self) -> int:
        return self.records.nbytes


class TransferError(RuntimeError):
    pass


def check_state_layouts(mine: Optional[StateLayout], theirs: Optional[dict]) -> Optional[StateLayout]:
    """The handshake's state check: both sides without state, or both with compatible state
    pools (else LayoutMismatch naming both). Returns the peer's layout (None: no state)."""
    other = StateLayout.from_json(theirs) if theirs else None
    if (mine is None) != (other is None):
        here, there = ("a recurrent-state pool", "none") if mine is not None else ("none", "a recurrent-state pool")
        raise LayoutMismatch(f"state layout mismatch: {here} here and {there} on the peer "
                             "(one model has Mamba2 layers, the other does not)")
    if mine is not None:
        mine.check_compatible(other)
    return other


class XferStatus(enum.Enum):
    PROC = "PROC"
    DONE = "DONE"
    ERR = "ERR"


class TransferBackend(abc.ABC):
    """Contract shared by the ``nixl`` and ``inproc`` backends (one protocol test suite runs both)."""

    name: str

    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable handshake payload: agent identity/metadata and the placed
        ``PoolLayout`` (``layout.to_json()``)."""

    @abc.abstractmethod
    def connect(self, peer: dict[str, Any]) -> str:
        """Register a peer from its ``metadata()`` (once per peer); returns its name.

        Raises LayoutMismatch before any transfer if the pools disagree.
        """

    @abc.abstractmethod
    def write(self, peer: str, src_pages: list[int], dst_pages: list[int],
              aux: Optional[tuple[int, int]], notif: bytes,
              state: Optional[tuple[int, int]] = None) -> Any:
        """Start a WRITE of pages (every layer, K and V), optionally one aux slot
        (src_slot, dst_slot) and, with the aux slot only, one state slot (src_slot,
        dst_slot: every Mamba2 layer's conv and SSM state) into the peer; ``notif`` reaches
        the peer after all the data. Returns a handle for ``status``. Raises TransferError if
        it cannot start."""

    @abc.abstractmethod
    def status(self, handle: Any) -> XferStatus:
        """Poll a transfer. Polling is what drives progress (and notification delivery) for
        some backends, so the initiator must keep polling until DONE or ERR. Backend
        exceptions (e.g. remote disconnect) are reported as ERR, never raised."""

    @abc.abstractmethod
    def release(self, handle: Any) -> None:
        """Free a finished (DONE or ERR) transfer's resources."""

    @abc.abstractmethod
    def notifications(self) -> list[bytes]:
        """Notifications received since the last call (target side)."""

    def disconnect(self, peer: str) -> None:
        """Forget a peer (e.g. after it died)."""

    def close(self) -> None:
        """Deregister buffers and stop the agent."""
