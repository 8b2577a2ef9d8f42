"""The decode role: pre-allocate pages, tell prefill where to write, then decode.

Per room: allocate pages for the prompt (past ``decode_prefix_len``) and an aux
slot, send the ``RoomMeta`` (Bootstrapping -> WaitingForInput), count the
transfer notifications (Transferring), and when the last one and every
earlier one have arrived read the aux record, check its room id (and
checksum), and admit the request into the running decode batch with its first
token (Success). On failure or timeout the pages (and the aux slot) are freed, but
only once nothing can still be writing into them: the engine's page manager holds them
until prefill confirms ``released`` or ``transfer.quarantine_s`` passes.
"""

from __future__ import annotations

import logging
import time

from toolkit.disagg.protocol import RoomMeta, RoomState, parse_notif
from toolkit.disagg.room import Room, WorkerBase, num_prompt_pages
from toolkit.engine.request import SamplingParams, Sequence

log = logging.getLogger(__name__)


class DecodeWorker(WorkerBase):
    role = "decode"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._handshaken: set[str] = set()
        self._peer_errors: dict[str, str] = {}
        self._pending: list[Room] = []  # Bootstrapping: waiting for pages / aux slot
        # (a failed room's pages that prefill might still be writing are held by the engine's
        # page manager until prefill says "released" or transfer.quarantine_s passes)

    # ---- requests ---------------------------------------------------------------------

    def submit(self, room: int, prompt_ids: list[int], params: SamplingParams, prefill_addr: str,
               on_token=None, on_done=None) -> Room:
        """Take a room; on_token(seq, token, text_delta) streams, on_done(room) ends it."""
        params.validate()
        self.engine.check_fits(list(prompt_ids), params)
        r = self._new_room(room, prompt_ids, params, prefill_addr, on_done)
        r.seq = Sequence(list(prompt_ids), params, request_id=f"room-{room}", on_token=on_token, room=room)
        self._pending.append(r)
        return r

    def abort(self, room: int, reason: str = "aborted") -> None:
        """Client abort: during transfer the room fails; while decoding the request stops."""
        r = self.rooms.get(room)
        if r is None:
            return
        if not r.state.done:
            self._fail(r, reason)
        elif r.state is RoomState.SUCCESS and not r.seq.is_finished:
            self.engine.abort(r.seq.request_id)

    # ---- the loop -----------------------------------------------------------------------

    def tick(self) -> None:
        for m in self.control.recv_all():
            self._on_control(m)
        for raw in self.backend.notifications():
            self._on_notif(raw)
        self.engine.poll_copies()  # (ended tier copies unpin pages the rooms below may need)
        self._admit_pending()
        if self.engine.has_unfinished():
            for seq in self.engine.step():
                if seq.is_finished:
                    self._finished(seq)
        self._timeouts()

    def _finished(self, seq: Sequence) -> None:
        r = self.rooms.get(seq.room)
        if r is not None and r.on_done is not None:
            r.on_done(r)

    def _admit_pending(self) -> None:
        """Pre-allocate pages in arrival order; stop at the first room that does not fit."""
        S = self.page_size
        running = self.engine.stats().running if self._pending else 0  # admitting pages changes nothing here
        while self._pending:
            r = self._pending[0]
            if r.state.done:
                self._pending.pop(0)
                continue
            if r.peer_addr in self._peer_errors:
                self._pending.pop(0)
                self._fail(r, self._peer_errors[r.peer_addr])
                continue
            self._handshake(r.peer_addr)
            busy = running + sum(
                1 for x in self.active_rooms() if x.state is not RoomState.BOOTSTRAPPING)
            if self.aux.num_free == 0 or busy >= self.engine.cfg.max_batch_size:
                return
            # the prefix this worker's cache holds (locked, even when empty); prefill sends the rest
            node, prefix = self.engine.match_prefix(r.prompt_ids)
            need = num_prompt_pages(r, S) - len(prefix)
            if not self.engine.can_reserve(need):
                self.engine.unlock_prefix(node)
                return
            self._pending.pop(0)
            r.prefix_node, r.prefix_pages = node, prefix
            r.seq.num_cached = len(prefix) * S
            # (with the pages, a state slot for a model with recurrent state: prefill writes
            # the request's final state there in the last transfer)
            r.pages, r.aux_slot = self.engine.reserve_pages(r.room, need), self.aux.allocate()
            r.meta = RoomMeta(r.room, list(r.pages), r.aux_slot, self.engine.reserved_state_slots(r.room),
                              len(prefix) * S)
            self.control.send(r.peer_addr, r.meta.to_msg())
            log.debug("room %d: sent metadata (%d pages, aux slot %d)", r.room, need, r.aux_slot)
            r.set(RoomState.WAITING_FOR_INPUT, time.perf_counter() + self.tcfg.wait_timeout_s)

    def _handshake(self, peer: str) -> None:
        if peer not in self._handshaken:
            self.control.send(peer, {"type": "handshake", "metadata": self.backend.metadata()})
            self._handshaken.add(peer)

    def _on_control(self, m: dict) -> None:
        kind, peer = m["type"], m["from"]
        if kind == "handshake_failed":
            self._peer_errors[peer] = f"handshake with prefill {peer} failed: {m['error']}"
            for r in self.active_rooms():
                if r.peer_addr == peer:  # prefill refused us: it never writes into these pages
                    self._fail(r, self._peer_errors[peer], tell_peer=False, quarantine=False)
        elif kind == "handshake_ok":
            self._peer_errors.pop(peer, None)
        elif kind == "failed":
            r = self.rooms.get(m["room"])
            if r is not None and not r.state.done:
                # prefill sends "failed" only when none of its writes is in flight
                self._fail(r, f"prefill failed the request: {m['error']}", tell_peer=False, quarantine=False)
        elif kind == "released":  # no write into the failed room's pages is in flight
            self.engine.end_hold(m["room"])
            self.aux.end_hold(m["room"])

    def _on_notif(self, raw: bytes) -> None:
        parsed = parse_notif(raw)
        if parsed is None:
            log.warning("ignoring unknown notification %r", raw)
            return
        room, kind, n = parsed
        r = self.rooms.get(room)
        if r is None or r.state.done:
            return  # late notification of a room that already ended
        r.notifs_seen += 1
        log.debug("room %d: notification %s %d (%d seen)", room, kind, n, r.notifs_seen)
        # progress resets the clock: a long prompt may take longer than wait_timeout_s in
        # total, as long as its chunks keep arriving
        r.deadline = time.perf_counter() + self.tcfg.wait_timeout_s
        if kind == "last":
            r.expected = n
        if r.state is RoomState.WAITING_FOR_INPUT:
            r.set(RoomState.TRANSFERRING)
        if r.expected is not None and r.notifs_seen == r.expected:
            self._complete(r)

    def _complete(self, r: Room) -> None:
        rec = self.aux.records[r.aux_slot].copy()
        if int(rec["room"]) != r.room:
            return self._fail(r, f"aux slot {r.aux_slot} holds room {int(rec['room'])}, expected room "
                                 f"{r.room}: slot mix-up", quarantine=False)
        if self.tcfg.checksum:
            got = self._checksum(r.pages, r.meta.state_slots[0] if r.meta.state_slots else 0)
            if got != int(rec["checksum"]):
                return self._fail(r, f"KV checksum mismatch for room {r.room}: prefill sent "
                                     f"{int(rec['checksum']):#x}, decode holds {got:#x}", quarantine=False)
        self.aux.free(r.aux_slot)
        r.aux_slot = None
        self.stats["rooms_ok"] += 1
        r.set(RoomState.SUCCESS)
        seq, pages, r.pages = r.seq, r.prefix_pages + r.pages, []
        node, r.prefix_node, r.prefix_pages = r.prefix_node, None, []
        self.engine.add_prefilled(seq, pages, int(rec["token"]), float(rec["logprob"]), prefix_node=node,
                                  reservation=r.room)
        if seq.is_finished:  # max_new_tokens == 1 or a stop token: the aux record was the answer
            self._finished(seq)

    def _timeouts(self) -> None:
        now = time.perf_counter()
        for r in self.active_rooms():
            if now > r.deadline:
                what = ("no pages or prefill never took the room" if r.state is RoomState.BOOTSTRAPPING
                        else f"prefill did not deliver the KV within transfer.wait_timeout_s="
                             f"{self.tcfg.wait_timeout_s}")
                self._fail(r, f"{r.state.value} timed out: {what}")
        self.engine.expire_holds()
        self.aux.expire_holds()

    def _fail(self, r: Room, error: str, tell_peer: bool = True, quarantine: bool = True) -> None:
        """End a room that has not succeeded. Its pages may still be a WRITE target unless
        prefill said otherwise, so they wait in quarantine until prefill confirms ``released``
        or ``transfer.quarantine_s`` passes (a dead prefill never writes again). A cached
        prefix is the tree's, never written by prefill: its lock drops now."""
        was_waiting = r.state is not RoomState.BOOTSTRAPPING
        self._finish_room(r, RoomState.FAILED, error)
        if r.prefix_node is not None:
            self.engine.unlock_prefix(r.prefix_node)
            r.prefix_node, r.prefix_pages = None, []
        if tell_peer and was_waiting:
            self.control.send(r.peer_addr, {"type": "abort", "room": r.room, "error": error})
        hold_s = self.tcfg.quarantine_s if quarantine and was_waiting else 0.0
        if r.meta is not None and self.engine.holds_pages(r.room):  # its pages (and state slot)
            self.engine.release_reserved(r.room, hold_s)
            r.pages = []
        if r.aux_slot is not None:  # the last chunk's transfer writes it: held like the pages
            if hold_s > 0:
                self.aux.hold(r.room, r.aux_slot, hold_s)
            else:
                self.aux.free(r.aux_slot)
            r.aux_slot = None

    def _holds(self, r: Room) -> bool:
        return self.engine.holds_pages(r.room) or self.aux.holds(r.room) or (
            r.state is RoomState.SUCCESS and r.seq is not None and not r.seq.is_finished)

    def idle(self) -> bool:
        return super().idle() and self.engine.stats().pages_held == 0 and self.aux.num_held == 0
