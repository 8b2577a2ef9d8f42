"""Control channel between P/D workers: small JSON messages over ZMQ.

Why ZMQ: the messages (handshake, room metadata, failure/abort) are tiny,
asynchronous and one-way; a PUSH/PULL pair per direction gives ordered
delivery from one sender without a server in the engine process, and the same
code runs over ``tcp://`` between processes and ``inproc://`` inside one
process (the ``inproc`` backend, notebooks). Completion is not a control
message: it rides on the transfer itself (a NIXL notification is delivered
only after its data), so the data never leaves the transfer backend.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import zmq


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (a server started next may take it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_tcp_address(host: str = "127.0.0.1") -> str:
    return f"tcp://{host}:{free_port(host)}"


class ControlChannel:
    """Receive on one bound address; send to peers by their addresses (sockets cached)."""

    def __init__(self, address: str, ctx: zmq.Context | None = None):
        self.ctx = ctx or zmq.Context.instance()
        self.address = address
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(address)
        self._push: dict[str, zmq.Socket] = {}

    def send(self, peer: str, msg: dict[str, Any]) -> None:
        sock = self._push.get(peer)
        if sock is None:
            sock = self._push[peer] = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.connect(peer)
        try:
            sock.send(json.dumps({**msg, "from": self.address}).encode(), zmq.NOBLOCK)
        except zmq.Again:  # peer gone and queue full: the room's timeout handles it
            pass

    def recv_all(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(json.loads(self._pull.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return out

    def close(self) -> None:
        for s in self._push.values():
            s.close(0)
        self._pull.close(0)
