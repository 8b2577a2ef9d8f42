"""The prefill role: run chunked prefill and write each finished chunk's KV into decode's pages.

Per room: wait for decode's ``RoomMeta`` (Bootstrapping), prefill the prompt
(WaitingForInput: the input is our own compute), post one WRITE per finished
chunk of whole pages (Transferring), and with the last chunk the aux record
(first token, logprob, room id, checksum) and, for a model with recurrent state, the
request's final state (every Mamba2 layer) into the slot decode listed. Pages are freed only when no
transfer that reads them is in flight: after Success, or after a failure once
the in-flight transfers have ended.
"""

from __future__ import annotations

import logging
import time

from toolkit.disagg.protocol import RoomMeta, RoomState, chunk_notif, last_notif
from toolkit.disagg.room import Room, WorkerBase, num_prompt_pages
from toolkit.disagg.transfer import LayoutMismatch, TransferError, XferStatus
from toolkit.engine.request import SamplingParams

log = logging.getLogger(__name__)


class PrefillWorker(WorkerBase):
    role = "prefill"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        assert self.engine.keep_pages_on_finish, "prefill engine must keep pages until transfers end"
        self._peers: dict[str, str] = {}  # decode control address -> transfer peer name
        self._peer_errors: dict[str, str] = {}
        self._early_meta: dict[int, tuple[float, RoomMeta, str]] = {}

    # ---- requests ---------------------------------------------------------------------

    def submit(self, room: int, prompt_ids: list[int], params: SamplingParams, decode_addr: str,
               on_done=None) -> Room:
        """Take a room; the prompt is prefilled once decode's metadata arrives."""
        params.validate()
        r = self._new_room(room, prompt_ids, params, decode_addr, on_done)
        early = self._early_meta.pop(room, None)
        if early is not None:
            self._start(r, early[1])
        return r

    def abort(self, room: int, reason: str = "aborted") -> None:
        r = self.rooms.get(room)
        if r is not None and not r.state.done:
            self._fail(r, reason, tell_peer=True)

    # ---- the loop -----------------------------------------------------------------------

    def tick(self) -> None:
        for m in self.control.recv_all():
            self._on_control(m)
        if self.engine.has_unfinished():
            self.engine.step()
            self.engine.wait_for_kv()  # the step's KV writes land before any WRITE reads the pool
        else:
            self.engine.poll_copies()  # tier copies end (and unpin their pages) while idle too
        for r in self.active_rooms():
            if r.seq is not None and r.state in (RoomState.WAITING_FOR_INPUT, RoomState.TRANSFERRING):
                self._post_ready(r)
        self._poll()
        self._timeouts()

    def _on_control(self, m: dict) -> None:
        kind, peer = m["type"], m["from"]
        if kind == "handshake":
            try:
                self._peers[peer] = self.backend.connect(m["metadata"])
                self._peer_errors.pop(peer, None)
                self.control.send(peer, {"type": "handshake_ok", "metadata": self.backend.metadata()})
            except (LayoutMismatch, TransferError) as e:
                self._peer_errors[peer] = str(e)
                self.control.send(peer, {"type": "handshake_failed", "error": str(e)})
        elif kind == "room_meta":
            meta = RoomMeta.from_msg(m)
            if peer in self._peer_errors:
                self.control.send(peer, {"type": "failed", "room": meta.room, "error": self._peer_errors[peer]})
                return
            r = self.rooms.get(meta.room)
            if r is None or r.state.done:  # decode was faster than our request: keep it for submit
                self._early_meta[meta.room] = (time.perf_counter(), meta, peer)
            else:
                self._start(r, meta)
        elif kind == "abort":
            r = self.rooms.get(m["room"])
            if r is not None and not r.state.done:
                self._fail(r, m.get("error", "aborted by decode"), tell_peer=False)
            elif r is not None and not r.handles:
                self.control.send(peer, {"type": "released", "room": m["room"]})

    def _start(self, r: Room, meta: RoomMeta) -> None:
        S = self.page_size
        prefix_pages = meta.decode_prefix_len // S
        want = num_prompt_pages(r, S) - prefix_pages
        if meta.decode_prefix_len % S or len(meta.dst_pages) != want:
            return self._fail(r, f"room metadata has {len(meta.dst_pages)} pages after a "
                                 f"{meta.decode_prefix_len}-token prefix; the prompt needs {want}", True)
        # the one rule both sides share: a room has state exactly when decode lists a slot
        has_state = self.engine.state_pool is not None
        if bool(meta.state_slots) != has_state or len(meta.state_slots) > 1:
            return self._fail(r, f"room metadata lists state slots {meta.state_slots}; this model "
                                 f"{'keeps' if has_state else 'has no'} recurrent state (one slot per room)", True)
        if r.peer_addr not in self._peers:
            return self._fail(r, "no handshake with this decode worker", True)
        if self.aux.num_free == 0:
            return self._fail(r, "prefill has no free aux slot (transfer.max_rooms)", True)
        try:
            r.seq = self.engine.add_request(r.prompt_ids, _first_token_only(r.params),
                                            request_id=f"room-{r.room}")
            r.seq.room = r.room
        except ValueError as e:
            return self._fail(r, str(e), True)
        r.meta, r.aux_slot, r.pages_sent = meta, self.aux.allocate(), prefix_pages
        log.debug("room %d: started, %d prompt tokens -> %d decode pages", r.room, len(r.prompt_ids),
                  len(meta.dst_pages))
        r.set(RoomState.WAITING_FOR_INPUT, time.perf_counter() + self.tcfg.wait_timeout_s)

    # ---- transfers ----------------------------------------------------------------------

    def _post_ready(self, r: Room) -> None:
        """Post the pages finished since the last post; whole pages only, except at the end."""
        S, seq = self.page_size, r.seq
        done = seq.is_finished and seq.finish_reason != "abort"
        ready = num_prompt_pages(r, S) if done else min(seq.num_computed, len(r.prompt_ids)) // S
        if r.last_posted or (ready <= r.pages_sent and not done):
            return
        prefix_pages = r.meta.decode_prefix_len // S
        src = seq.pages[r.pages_sent:ready]
        dst = r.meta.dst_pages[r.pages_sent - prefix_pages:ready - prefix_pages]
        aux = state = None
        if done:  # the last transfer: the aux record always, the state when there is state
            self._fill_aux(r, prefix_pages)
            aux = (r.aux_slot, r.meta.aux_slot)
            if r.meta.state_slots:
                state = (seq.state_slot, r.meta.state_slots[0])
        notif = last_notif(r.room, r.num_transfers + 1) if done else chunk_notif(r.room, r.num_transfers)
        try:
            h = self._write(r, self._peers[r.peer_addr], src, dst, aux, notif, state=state)
        except TransferError as e:
            self.stats["transfer_failures"] += 1
            return self._fail(r, f"transfer failed: {e}", tell_peer=True)
        log.debug("room %d: posted transfer %d (%d pages%s)", r.room, r.num_transfers, len(src),
                  ", last + aux" if done else "")
        r.handles.append((h, len(r.transfers)))
        r.transfers.append((time.perf_counter(), 0.0, len(src)))
        r.num_transfers += 1
        r.pages_sent = ready
        r.src_pages += src
        r.last_posted = done
        self.stats["transfer_bytes"] += 2 * len(src) * self.engine.pool.layout.page_bytes
        if r.state is RoomState.WAITING_FOR_INPUT:
            r.set(RoomState.TRANSFERRING)

    def _fill_aux(self, r: Room, prefix_pages: int) -> None:
        rec = self.aux.records[r.aux_slot]
        rec["room"], rec["token"] = r.room, r.seq.output_ids[0]
        rec["logprob"], rec["num_pages"] = r.seq.output_logprobs[0], len(r.meta.dst_pages)
        rec["checksum"] = (self._checksum(r.seq.pages[prefix_pages:], r.seq.state_slot if r.meta.state_slots else 0)
                           if self.tcfg.checksum else 0)

    def _poll(self) -> None:
        """Drive every in-flight transfer; a room succeeds when its last transfer is done."""
        for r in list(self.rooms.values()):
            if not r.handles:
                continue
            pending, failed = [], False
            for h, i in r.handles:
                st = self.backend.status(h)
                if st is XferStatus.PROC:
                    pending.append((h, i))
                else:
                    self.backend.release(h)
                    failed |= st is XferStatus.ERR
                    posted, _, n = r.transfers[i]
                    r.transfers[i] = (posted, time.perf_counter(), n)
            r.handles = pending
            if failed:
                self.stats["transfer_failures"] += 1
                if not r.state.done:
                    self._fail(r, "transfer failed (the backend reported an error)", tell_peer=True)
                    continue
            if r.handles:
                continue
            if r.state.done:  # failed earlier; the last in-flight transfer has now ended
                self._release(r)
            elif r.last_posted:
                self._release(r, keep=True)
                self._finish_room(r, RoomState.SUCCESS)

    def _timeouts(self) -> None:
        now = time.perf_counter()
        for r in self.active_rooms():
            if now > r.deadline:
                what = ("decode never sent the room metadata" if r.state is RoomState.BOOTSTRAPPING
                        else "the transfer did not finish")
                self._fail(r, f"{r.state.value} timed out: {what}", tell_peer=True)
        for room, (t, _, _) in list(self._early_meta.items()):
            if now - t > self.tcfg.bootstrap_timeout_s:
                del self._early_meta[room]

    def _fail(self, r: Room, error: str, tell_peer: bool) -> None:
        if r.seq is not None and not r.seq.is_finished:
            self.engine.abort(r.seq.request_id)  # keeps pages: freed once nothing is in flight
        self._finish_room(r, RoomState.FAILED, error)
        if tell_peer:
            self.control.send(r.peer_addr, {"type": "failed", "room": r.room, "error": error})
        if not r.handles:
            self._release(r)

    def _release(self, r: Room, keep: bool = False) -> None:
        """Give back the room's pages and aux slot (no transfer reads them any more). With
        ``keep`` (the room succeeded) the prompt's KV enters the prefix cache, if there is one."""
        if r.seq is not None and r.seq.pages:
            self.engine.release_pages(r.seq, keep=keep)
        if r.aux_slot is not None:
            self.aux.free(r.aux_slot)
            r.aux_slot = None
        if r.state is RoomState.FAILED:
            self.control.send(r.peer_addr, {"type": "released", "room": r.room})

    def _holds(self, r: Room) -> bool:
        return bool(r.handles) or r.aux_slot is not None


def _first_token_only(p: SamplingParams) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(p, max_new_tokens=1, stop=[])
