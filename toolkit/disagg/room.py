"""What both P/D workers share: the room record, the control channel, backends, timeouts."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Any, Callable, Optional

from toolkit.cache.allocator import pages_for
from toolkit.config.schema import TransferConfig
from toolkit.disagg.control import ControlChannel
from toolkit.disagg.protocol import RoomMeta, RoomState, pages_checksum
from toolkit.disagg.transfer import AuxBuffer, TransferBackend, TransferError
from toolkit.engine.engine import Engine
from toolkit.engine.request import SamplingParams, Sequence

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Room:
    room: int
    prompt_ids: list[int]
    params: SamplingParams
    peer_addr: str  # the other side's control address
    state: RoomState = RoomState.BOOTSTRAPPING
    deadline: float = 0.0
    error: Optional[str] = None
    seq: Optional[Sequence] = None
    meta: Optional[RoomMeta] = None
    pages: list[int] = dataclasses.field(default_factory=list)  # decode: pre-allocated pages
    aux_slot: Optional[int] = None
    # prefill side
    pages_sent: int = 0  # prompt pages (from the prefix on) already posted
    src_pages: list[int] = dataclasses.field(default_factory=list)  # prefill pages posted, in order
    handles: list = dataclasses.field(default_factory=list)  # (backend handle, index in transfers)
    num_transfers: int = 0
    last_posted: bool = False
    # decode side
    prefix_node: Optional[object] = None  # the decode cache's locked match (None: no cache)
    prefix_pages: list[int] = dataclasses.field(default_factory=list)  # its pages: the prompt's first ones
    notifs_seen: int = 0
    expected: Optional[int] = None
    # (time, state) history, for tracing
    history: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    # per transfer on prefill: (posted time, finished time or 0, num_pages), for tracing
    transfers: list[tuple[float, float, int]] = dataclasses.field(default_factory=list)
    on_done: Optional[Callable[["Room"], None]] = None

    @property
    def over(self) -> bool:
        """Nothing more will happen to the request: it failed, or succeeded and finished."""
        return self.state is RoomState.FAILED or (self.state is RoomState.SUCCESS and self.seq.is_finished)

    def set(self, state: RoomState, deadline: float | None = None) -> None:
        self.state = state
        self.history.append((time.perf_counter(), state.value))
        if deadline is not None:
            self.deadline = deadline


def num_prompt_pages(room: Room, page_size: int) -> int:
    return pages_for(len(room.prompt_ids), page_size)


class WorkerBase:
    """A P/D worker: an engine, a transfer backend, a control channel and the room table.

    ``tick()`` runs one iteration of the worker loop (control messages, one engine
    step, transfers, timeouts); a server thread calls it in a loop, a notebook by hand.
    """

    role = "base"

    def __init__(self, engine: Engine, backend: TransferBackend, control: ControlChannel,
                 tcfg: TransferConfig, aux: AuxBuffer):
        self.engine, self.backend, self.control, self.tcfg, self.aux = engine, backend, control, tcfg, aux
        self.rooms: dict[int, Room] = {}
        self._faults = random.Random(tcfg.fault_seed)
        self.stats = {"rooms_ok": 0, "rooms_failed": 0, "transfer_bytes": 0, "transfer_failures": 0}

    @property
    def page_size(self) -> int:
        return self.engine.cfg.page_size

    def _new_room(self, room: int, prompt_ids: list[int], params: SamplingParams, peer_addr: str,
                  on_done) -> Room:
        old = self.rooms.get(room)
        # (a room that ended but still holds pages or an aux slot, e.g. a transfer still in
        # flight, keeps its record: replacing it would lose those)
        if old is not None and (not old.state.done or self._holds(old)):
            raise ValueError(f"room {room} is already in use on this {self.role} worker")
        r = Room(room, list(prompt_ids), params, peer_addr, on_done=on_done)
        r.set(RoomState.BOOTSTRAPPING, time.perf_counter() + self.tcfg.bootstrap_timeout_s)
        self.rooms[room] = r
        return r

    def _checksum(self, pages: list[int], state_slot: int = 0) -> int:
        """Digest of the KV of ``pages`` (every layer, K and V) and of state slot
        ``state_slot`` (0: none) as this side's pools hold them."""
        state = self.engine.read_state(state_slot) if state_slot else ()
        return pages_checksum(*self.engine.read_pages(pages), *state)

    def _inject_fault(self) -> bool:
        return self.tcfg.fault_rate > 0 and self._faults.random() < self.tcfg.fault_rate

    def _write(self, r: Room, peer: str, src: list[int], dst: list[int], aux, notif: bytes,
               state=None) -> Any:
        if self._inject_fault():
            raise TransferError(f"injected transfer fault (transfer.fault_rate={self.tcfg.fault_rate})")
        return self.backend.write(peer, src, dst, aux, notif, state=state)

    def _finish_room(self, r: Room, state: RoomState, error: str | None = None) -> None:
        r.error = error
        r.set(state)
        self.stats["rooms_ok" if state is RoomState.SUCCESS else "rooms_failed"] += 1
        if error:
            log.warning("%s room %d failed: %s", self.role, r.room, error)
        if r.on_done is not None:
            r.on_done(r)

    def active_rooms(self) -> list[Room]:
        return [r for r in self.rooms.values() if not r.state.done]

    def idle(self) -> bool:
        return not self.active_rooms() and not self.engine.has_unfinished()

    def warmup(self, on_progress=None):
        """Before the first room: compile the engine's bucket set (``Engine.warmup``)."""
        return self.engine.warmup(on_progress=on_progress)

    def forget_done(self) -> None:
        for k in [k for k, r in self.rooms.items() if r.state.done and not self._holds(r)]:
            del self.rooms[k]

    def _holds(self, r: Room) -> bool:
        return False

    def close(self) -> None:
        self.backend.close()
        self.control.close()
        self.engine.close()  # tier copies in flight end; the storage index is on disk
