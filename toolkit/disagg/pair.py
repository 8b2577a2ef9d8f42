"""Building P/D workers from config, and ``PDPair``: prefill + decode in one process.

``PDPair`` drives both workers from one thread (as the ``inproc`` backend
requires) and serves requests like ``Engine.generate``: each request becomes a
room on both sides, prefill writes its KV into decode's pages, decode finishes it.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid

from toolkit.config.schema import CacheConfig, EngineConfig, TransferConfig
from toolkit.disagg.choices import PD_TRANSFER_BACKENDS
from toolkit.disagg.control import ControlChannel, free_tcp_address
from toolkit.disagg.decode import DecodeWorker
from toolkit.disagg.prefill import PrefillWorker
from toolkit.disagg.transfer import AuxBuffer, TransferBackend
from toolkit.engine.engine import Engine
from toolkit.engine.request import RequestOutput, SamplingParams


def make_backend(kind: str, agent_name: str, engine: Engine, aux: AuxBuffer, tcfg: TransferConfig
                 ) -> TransferBackend:
    if kind == "inproc":
        from toolkit.disagg.inproc_backend import InprocBackend

        return InprocBackend(agent_name, engine.pool, aux, engine.state_pool)
    if kind == "nixl":
        from toolkit.disagg.nixl_backend import NixlBackend

        ucx = {"num_threads": tcfg.ucx_threads, "split_batch_size": tcfg.ucx_split_batch}
        state = engine.state_pool.describe() if engine.state_pool is not None else None
        return NixlBackend(agent_name, engine.pool.describe(), aux, backends=tuple(tcfg.nixl_backends),
                           backend_params={"UCX": ucx} if tcfg.ucx_threads else None, state=state)
    raise ValueError(f"transfer.backend={kind!r}; allowed: {', '.join(PD_TRANSFER_BACKENDS)}")


def make_worker(role: str, engine: Engine, tcfg: TransferConfig, control_address: str = "",
                agent_name: str = ""):
    """A prefill or decode worker around an engine (prefill engines must keep pages on finish)."""
    cls = {"prefill": PrefillWorker, "decode": DecodeWorker}[role]
    agent_name = agent_name or f"{role}-{uuid.uuid4().hex[:8]}"
    if not control_address:
        control_address = f"inproc://{agent_name}" if tcfg.backend == "inproc" else free_tcp_address()
    aux = AuxBuffer(tcfg.max_rooms)
    backend = make_backend(tcfg.backend, agent_name, engine, aux, tcfg)
    return cls(engine, backend, ControlChannel(control_address), tcfg, aux)


class PDPair:
    def __init__(self, ckpt, ecfg: EngineConfig, tcfg: TransferConfig, dtype=None,
                 decode_ecfg: EngineConfig | None = None, prefill_cache: CacheConfig | None = None,
                 decode_cache: CacheConfig | None = None):
        """prefill_cache, decode_cache: each engine's prefix cache (``cache.policy``; radix,
        ``CacheConfig``'s default, when not given). With decode's, a turn asks prefill only
        for the pages decode lacks."""
        import jax.numpy as jnp

        dtype = dtype or jnp.float32
        rooms = tcfg.max_rooms  # (each room may hold a state slot on both sides: hybrid models)
        self.prefill = make_worker("prefill", Engine(ckpt, ecfg, dtype, keep_pages_on_finish=True, prefill_only=True,
                                                     cache=prefill_cache, transfer_rooms=rooms), tcfg)
        self.decode = make_worker("decode", Engine(ckpt, decode_ecfg or ecfg, dtype, cache=decode_cache,
                                                   transfer_rooms=rooms), tcfg)
        self._rooms = itertools.count(random.randrange(1 << 40))

    def step(self) -> None:
        self.prefill.tick()
        self.decode.tick()

    def submit(self, prompt_ids: list[int], params: SamplingParams, room: int | None = None, on_token=None):
        room = next(self._rooms) if room is None else room
        d = self.decode.submit(room, prompt_ids, params, self.prefill.control.address, on_token=on_token)
        self.prefill.submit(room, prompt_ids, params, self.decode.control.address)
        return d

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 timeout_s: float = 600) -> list[RequestOutput | str]:
        """RequestOutput per prompt, or the error string of a failed room."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rooms = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        t0 = time.perf_counter()
        while not all(r.over for r in rooms):
            self.step()
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError("P/D generate did not finish")
        while not (self.prefill.idle() and self.decode.idle()):
            self.step()  # let in-flight bookkeeping (releases, quarantine) settle
        return [RequestOutput.of(r.seq) if r.error is None else r.error for r in rooms]

    def close(self) -> None:
        self.prefill.close()
        self.decode.close()

