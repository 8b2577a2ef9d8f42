"""P/D fixtures: prompts that hit the protocol's edge cases, and pairs on every backend."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.conftest import engine_cfg
from toolkit.config.schema import TransferConfig
from toolkit.engine.engine import Engine
from toolkit.engine.request import SamplingParams

PAGE = 4
CHUNK = 16


def edge_prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    """A 1-token prompt, one ending exactly on a page boundary, one spanning several prefill
    chunks, and random lengths for the rest."""
    rng = np.random.default_rng(seed)
    lens = ([1, 2 * PAGE, 3 * CHUNK + 5, PAGE + 1, CHUNK] + list(rng.integers(1, 60, max(0, n - 5))))[:n]
    return [list(map(int, rng.integers(3, 256, L))) for L in lens]


def edge_params(n: int) -> list[SamplingParams]:
    """max_new_tokens=1 for one request: its answer comes from the aux record alone."""
    ps = [SamplingParams(max_new_tokens=int(k), ignore_eos=True) for k in np.random.default_rng(1).integers(2, 12, n)]
    if n > 3:
        ps[3] = dataclasses.replace(ps[3], max_new_tokens=1)
    return ps


def unified_reference(ckpt, prompts, params):
    return [o.token_ids for o in Engine(ckpt, engine_cfg(page_size=PAGE, chunk_size=CHUNK)).generate(prompts, params)]


BACKENDS = ["inproc", "nixl"]


def has_nixl() -> bool:
    from toolkit.disagg.nixl_backend import nixl_available

    return nixl_available()


@pytest.fixture(params=BACKENDS)
def make_pair(request):
    """PDPair factory on each backend; afterwards both allocators and aux buffers are full again."""
    if request.param == "nixl" and not has_nixl():
        pytest.fail("nixl is not installed (pip install -e '.[nixl]')")
    from toolkit.disagg.pair import PDPair

    made = []

    def make(ckpt, tcfg_kw=None, prefill_cache: str = "none", decode_cache: str = "none", **ekw):
        from toolkit.config.schema import CacheConfig

        tcfg = TransferConfig(backend=request.param, **(tcfg_kw or {}))
        ecfg = engine_cfg(page_size=PAGE, chunk_size=CHUNK, **ekw)
        pair = PDPair(ckpt, ecfg, tcfg, prefill_cache=CacheConfig(policy=prefill_cache),
                      decode_cache=CacheConfig(policy=decode_cache))
        made.append(pair)
        return pair

    make.backend = request.param
    yield make
    for pair in made:
        for w in (pair.prefill, pair.decode):
            used = w.engine.stats().pages_used
            assert used == 0, f"{w.role}: {used} pages in use"
            w.engine.check_pages()
            w.engine.flush_cache()
            assert w.engine.stats().pages_free == w.engine.stats().pages_usable, f"{w.role}: pages missing"
            assert w.aux.num_free == w.tcfg.max_rooms, f"{w.role}: aux slots leaked"
            st = w.engine.stats()
            assert st.state_slots_free == st.state_slots, f"{w.role}: state slots leaked"
        pair.close()
