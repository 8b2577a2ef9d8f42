"""``inproc``: both engines in one process (a notebook, a quick experiment).

Same protocol as ``nixl``; the copy is a jitted scatter of the source pages into
the destination pool with the destination donated, so its address stays put.
Both workers must be driven from one thread (``toolkit.disagg.pair.PDPair``):
a write touches the peer's pool between its steps, never during one.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention_ref import gather_pages, scatter_pages
from toolkit.disagg.transfer import AuxBuffer, TransferBackend, TransferError, XferStatus, check_state_layouts
from toolkit.engine.buckets import bucket, pow2_buckets

_REGISTRY: dict[str, "InprocBackend"] = {}


@jax.jit
def _gather(src, idx):
    return gather_pages(src, idx)


_scatter = jax.jit(scatter_pages, donate_argnums=0)


@jax.jit
def _take_slot(buf, slot):
    return buf[slot]


_put_slot = jax.jit(lambda buf, slot, val: buf.at[slot].set(val), donate_argnums=0)


class InprocBackend(TransferBackend):
    name = "inproc"

    def __init__(self, agent_name: str, pool, aux: AuxBuffer, state_pool=None):
        """state_pool: the engine's ``StatePool`` (a hybrid model), else None."""
        if agent_name in _REGISTRY:
            raise ValueError(f"inproc agent {agent_name!r} already exists")
        self.agent_name, self.pool, self.aux, self.state_pool = agent_name, pool, aux, state_pool
        self.layout = pool.describe()
        self.state_layout = state_pool.describe() if state_pool is not None else None
        self._peers: set[str] = set()
        self._notifs: list[bytes] = []
        self._page_buckets = pow2_buckets(1, pool.layout.num_pages)
        _REGISTRY[agent_name] = self

    def metadata(self) -> dict[str, Any]:
        return {"agent": self.agent_name, "layout": self.layout.to_json(),
                "state_layout": self.state_layout.to_json() if self.state_layout else None}

    def connect(self, peer: dict[str, Any]) -> str:
        name = peer["agent"]
        other = _REGISTRY.get(name)
        if other is None:
            raise TransferError(f"no inproc agent named {name!r} in this process")
        self.layout.check_compatible(other.layout)
        check_state_layouts(self.state_layout, peer.get("state_layout"))
        self._peers.add(name)
        return name

    def write(self, peer: str, src_pages: list[int], dst_pages: list[int],
              aux: Optional[tuple[int, int]], notif: bytes,
              state: Optional[tuple[int, int]] = None) -> Any:
        dst = _REGISTRY.get(peer)
        if peer not in self._peers or dst is None:
            raise TransferError(f"peer {peer!r} is not connected")
        assert len(src_pages) == len(dst_pages)
        assert state is None or (aux is not None and self.state_pool is not None), \
            "a state slot moves with the aux record, and only for a model with state"
        written = []
        if src_pages and self.layout.page_bytes:  # (a Mamba2 model's pool has no layer)
            n = bucket(len(src_pages), self._page_buckets)
            pad = [0] * (n - len(src_pages))  # page 0 -> page 0: the padding page absorbs it
            src_idx = jnp.asarray(np.asarray(list(src_pages) + pad, np.int32))
            dst_idx = jnp.asarray(np.asarray(list(dst_pages) + pad, np.int32))
            dev = dst.pool.k.devices().pop()
            for name in ("k", "v"):
                staged = jax.device_put(_gather(getattr(self.pool, name), src_idx), dev)
                setattr(dst.pool, name, _scatter(getattr(dst.pool, name), dst_idx, staged))
                written.append(getattr(dst.pool, name))
        if state is not None:
            dev = dst.state_pool.conv.devices().pop()
            for name in ("conv", "ssm"):
                staged = jax.device_put(_take_slot(getattr(self.state_pool, name), np.int32(state[0])), dev)
                setattr(dst.state_pool, name, _put_slot(getattr(dst.state_pool, name), np.int32(state[1]), staged))
                written.append(getattr(dst.state_pool, name))
        if aux is not None:
            dst.aux.records[aux[1]] = self.aux.records[aux[0]]
        # The copy runs asynchronously (JAX dispatch); the notification is queued now but
        # the peer drains it on its next tick, after this thread has dispatched the copy,
        # and any read of the pool there waits for it. The handle is done when the copy is.
        dst._notifs.append(notif)
        return written

    def status(self, handle: Any) -> XferStatus:
        # a pool array already donated to the peer's next step was consumed after the copy
        done = all(a.is_deleted() or a.is_ready() for a in handle)
        return XferStatus.DONE if done else XferStatus.PROC

    def release(self, handle: Any) -> None:
        pass

    def notifications(self) -> list[bytes]:
        out, self._notifs = self._notifs, []
        return out

    def disconnect(self, peer: str) -> None:
        self._peers.discard(peer)

    def close(self) -> None:
        _REGISTRY.pop(self.agent_name, None)
