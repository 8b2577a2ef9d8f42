"""Decode-side offload (cache.decode_offload with host and storage tiers) through real
prefill and decode processes over NIXL: sustained load with pages reused all the time,
then a restart on the same storage directory."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import engine_cfg
from tests.disagg.conftest import CHUNK, PAGE
from tests.disagg.procs import Worker, pd_request
from toolkit.config.schema import CacheConfig
from toolkit.engine.engine import Engine
from toolkit.engine.request import SamplingParams

pytestmark = pytest.mark.timeout(900)

N, CONCURRENCY = 200, 24


def workload(seed: int = 21):
    """N different prompts over a few shared system prefixes (so matches reach the tiers),
    with answers long enough to fill pages while decoding."""
    rng = np.random.default_rng(seed)
    systems = [list(map(int, rng.integers(3, 256, 13))) for _ in range(6)]
    prompts = [systems[i % 6] + list(map(int, rng.integers(3, 256, int(rng.integers(1, 20))))) for i in range(N)]
    params = [SamplingParams(max_new_tokens=int(k), ignore_eos=True) for k in rng.integers(5, 14, N)]
    return prompts, params


def test_offload_under_load_is_never_contaminated_and_survives_restart(tiny_ckpt, tmp_path):
    """Guards against SGLang's offload bug (sgl-project/sglang#24226: pages freed while decode
    still read them, or while device->host copies were in flight; ~5% of answers became
    other prompts' text): 200 concurrent requests through a decode worker whose 47-page
    pool is reused constantly, offloading to host and storage as it decodes; every answer
    must equal the no-offload greedy reference, every page must come back. Then the decode
    worker stops and a fresh unified engine on the same storage path finds the
    conversations' pages (cached tokens > 0) and answers the same."""
    prompts, params = workload()
    ref_engine = Engine(tiny_ckpt, engine_cfg(page_size=PAGE, chunk_size=CHUNK, num_pages=512, max_batch_size=32))
    ref = [o.token_ids for o in ref_engine.generate(prompts, params)]
    storage = str(tmp_path / "kv")
    tiers = ["cache.host_pages=128", "cache.storage=file", f"cache.storage_path={storage}", "cache.storage_gb=0.01"]
    pre = Worker("prefill", ["cache.host_pages=64"])
    # (rooms wait for pages while the small pool is full, and for step shapes compiling on
    # first use here: a longer bootstrap timeout than the default 30 s)
    dec = Worker("decode", ["engine.num_pages=48", "cache.decode_offload=true", "transfer.bootstrap_timeout_s=300",
                            *tiers])
    try:
        def one(i):
            p = {"max_new_tokens": params[i].max_new_tokens, "ignore_eos": True, "temperature": 0}
            return pd_request(pre, dec, 5000 + i, prompts[i], p)

        with ThreadPoolExecutor(CONCURRENCY) as ex:
            got = list(ex.map(one, range(N)))
        bad = [i for i, g in enumerate(got) if g.get("tokens") != ref[i]]
        assert not bad, f"{len(bad)} of {N} answers differ from the reference, e.g. #{bad[0]}: {got[bad[0]]}"
        st = dec.wait_idle(60)
        m = dec.metrics()
        assert m["kv_offloaded_bytes_host"] > 0 and m["kv_offloaded_bytes_storage"] > 0, m
        assert m["prefix_cache_evicted_pages"] > 0, "the decode pool was never short: pages not reused"
        assert st["pages_used"] == 0
    finally:
        pre.stop()
        dec.stop()  # shutdown waits for the copies in flight; the index is on disk

    # a fresh worker on the same storage: a finished conversation's prompt and answer
    conv = prompts[7] + ref[7]
    want = ref_engine.generate([conv], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    e = Engine(tiny_ckpt, engine_cfg(page_size=PAGE, chunk_size=CHUNK),
               cache=CacheConfig(host_pages=64, storage="file", storage_path=storage, storage_gb=0.01))
    try:
        out = e.generate([conv], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
        assert out.token_ids == want
        assert out.cached_tokens > 0 and e.stats().storage_hit_tokens > 0, "nothing found in storage after restart"
    finally:
        e.close()
