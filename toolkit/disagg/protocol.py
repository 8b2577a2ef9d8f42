"""The P/D room protocol: states, room metadata, completion notifications, checksums.

Room states (both sides):

    Bootstrapping --> WaitingForInput --> Transferring --> Success
          |                  |                 |
          +------------------+-----------------+--> Failed

See docs/pd_protocol.md for the full spec.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib

import numpy as np


class RoomState(enum.Enum):
    BOOTSTRAPPING = "Bootstrapping"
    WAITING_FOR_INPUT = "WaitingForInput"
    TRANSFERRING = "Transferring"
    SUCCESS = "Success"
    FAILED = "Failed"

    @property
    def done(self) -> bool:
        return self in (RoomState.SUCCESS, RoomState.FAILED)


@dataclasses.dataclass
class RoomMeta:
    """What decode tells prefill about one room (decode pre-allocated these)."""

    room: int
    dst_pages: list[int]  # decode pages for prompt pages decode_prefix_len // S onwards
    aux_slot: int
    state_slots: list[int]  # empty: the model has no recurrent state; never "wait for state"
    decode_prefix_len: int  # prompt tokens decode already holds (page aligned); 0 without a prefix cache

    def to_msg(self) -> dict:
        return {"type": "room_meta", **dataclasses.asdict(self)}

    @classmethod
    def from_msg(cls, m: dict) -> "RoomMeta":
        return cls(m["room"], list(m["dst_pages"]), m["aux_slot"], list(m["state_slots"]),
                   m["decode_prefix_len"])


def chunk_notif(room: int, index: int) -> bytes:
    return f"pd:{room}:chunk:{index}".encode()


def last_notif(room: int, num_transfers: int) -> bytes:
    """The last transfer's notification: it says how many transfers the room used in total,
    so decode knows every earlier chunk has landed too."""
    return f"pd:{room}:last:{num_transfers}".encode()


def parse_notif(raw: bytes) -> tuple[int, str, int] | None:
    try:
        tag, room, kind, n = raw.decode().split(":")
        return (int(room), kind, int(n)) if tag == "pd" and kind in ("chunk", "last") else None
    except (ValueError, UnicodeDecodeError):
        return None


def pages_checksum(k_host: np.ndarray, v_host: np.ndarray, *state: np.ndarray) -> int:
    """64-bit digest of a room's pages ([n, L, ...] host copies of K and V, in page order)
    and, for a model with recurrent state, its state slot's buffers (conv, ssm)."""
    h = hashlib.blake2b(digest_size=8)
    for a in (k_host, v_host, *state):
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little")
