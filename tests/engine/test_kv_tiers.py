"""The host and storage tiers through the unified engine: every answer equals cache=none's
greedy answer, whatever tier the prefix came from, across a restart, with a corrupted or
failing storage, and with decode-side offload (commits as decoding fills pages)."""

from __future__ import annotations

import logging
import os

import pytest

from toolkit.config import validate as V
from toolkit.config.schema import CacheConfig
from toolkit.engine.request import SamplingParams
from tests.engine.test_prefix_cache import conversations

CFG = dict(max_model_len=256, chunk_size=32, max_prefill_seqs=4, max_batch_size=8, page_size=4, num_pages=48)


def tiered(tmp_path=None, host=96, storage=False, **kw) -> CacheConfig:
    extra = dict(storage="file", storage_path=str(tmp_path), storage_gb=0.01) if storage else {}
    return CacheConfig(policy="radix", host_pages=host, **extra, **kw)


def turns(engine, system, convs, max_new=6):
    """Each conversation one turn at a time (all concurrently); returns per turn the answers."""
    history = [list(system) for _ in convs]
    out = []
    for t in range(len(convs[0])):
        for i, c in enumerate(convs):
            history[i] += c[t]
        seqs = engine.generate([list(h) for h in history], SamplingParams(max_new_tokens=max_new, ignore_eos=True))
        engine.check_pages()
        for i, s in enumerate(seqs):
            history[i] += s.token_ids
        out.append([s.token_ids for s in seqs])
    return out, history


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """cache=none's answers for the workload below (one engine, built once)."""
    from tests.conftest import engine_cfg
    from toolkit.engine.engine import Engine

    system, convs = conversations(6, 3, seed=5, system_len=30)
    e = Engine(tiny_ckpt, engine_cfg(**{**CFG, "num_pages": 256}), cache=CacheConfig(policy="none"))
    return system, convs, turns(e, system, convs)


def test_working_set_past_the_device_pool_is_served_from_host(tiny_ckpt, make_engine, reference):
    """Guards against a host tier that changes an answer (a page loaded into the wrong
    device page, loaded before its copy landed) or that never hits: 6 conversations whose
    prefixes overflow a 47-page device pool, turn after turn, with overlap scheduling."""
    system, convs, (ref, _) = reference
    e = make_engine(tiny_ckpt, cache=tiered(), **CFG)
    got, _ = turns(e, system, convs)
    assert got == ref
    st = e.stats()
    assert st.host_hit_tokens > 0, "the host tier never served a prefix"
    assert st.offloaded_bytes_host > 0 and st.host_slots_used > 0


def test_conversation_continues_from_host_and_from_storage_after_restart(tiny_ckpt, make_engine, reference,
                                                                          tmp_path):
    """Guards against pages that come back wrong from host or from storage, and against a
    storage index that does not survive a restart: the device tree is flushed (host
    serves the next turn), then a fresh engine on the same storage path serves the next
    with cached tokens from storage; every answer equals cache=none's."""
    system, convs, (ref, hist) = reference
    e = make_engine(tiny_ckpt, cache=tiered(tmp_path, storage=True), **CFG)
    first, _ = turns(e, system, convs[:2])
    e.wait_for_copies()
    e.flush_cache()
    before = e.stats().host_hit_tokens
    # the same prompts again: found in host only (the device tree is empty)
    history = [list(system) + c[0] for c in convs[:2]]
    again = e.generate(history, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [s.token_ids for s in again] == [r for r in ref[0][:2]]
    assert e.stats().host_hit_tokens > before, "the flushed prefix was not found in host"
    e.wait_for_copies()
    e.flush_cache()
    e.close()  # its index is on disk; the directory is free for the next worker

    e2 = make_engine(tiny_ckpt, cache=tiered(tmp_path, storage=True), **CFG)
    out = e2.generate([list(system) + c[0] for c in convs[:2]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [s.token_ids for s in out] == ref[0][:2]
    assert all(s.cached_tokens > 0 for s in out), "a restarted worker found nothing in storage"
    assert e2.stats().storage_hit_tokens > 0


def test_corrupt_or_truncated_storage_is_recomputed(tiny_ckpt, make_engine, reference, tmp_path, caplog):
    """Guards against serving corrupted KV from disk: every page's bytes are flipped and the
    file is then cut short; a restarted worker detects it (checksum), recomputes, answers
    right and keeps serving."""
    system, convs, (ref, _) = reference
    prompts = [list(system) + c[0] for c in convs[:2]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    e = make_engine(tiny_ckpt, cache=tiered(tmp_path, storage=True), **CFG)
    e.generate(prompts, params)
    e.wait_for_copies()
    e.flush_cache()
    e.close()
    f = tmp_path / "pages.bin"
    data = bytearray(f.read_bytes())
    for off in range(0, 64 * 4096, 997):
        data[off] ^= 0x5A
    f.write_bytes(bytes(data[:len(data) // 2]))  # corrupted, and truncated
    with caplog.at_level(logging.ERROR):
        e2 = make_engine(tiny_ckpt, cache=tiered(tmp_path, storage=True), **CFG)
        out = e2.generate(prompts, params)
    assert [s.token_ids for s in out] == ref[0][:2]
    assert "checksum" in caplog.text
    again = e2.generate(prompts, params)  # still serving, now from its own device tree
    assert [s.token_ids for s in again] == ref[0][:2]


def test_full_disk_turns_storage_off_not_the_requests(tiny_ckpt, make_engine, reference, tmp_path, caplog):
    """Guards against a failing disk failing requests: the index write hits ENOSPC (the
    index file replaced by /dev/full), storage turns itself off with a logged error, every
    answer is still right and the host tier keeps working."""
    system, convs, (ref, _) = reference
    e = make_engine(tiny_ckpt, cache=tiered(tmp_path, storage=True), **CFG)
    index = tmp_path / "index.log"
    if index.exists():
        index.unlink()
    os.symlink("/dev/full", index)
    with caplog.at_level(logging.ERROR):
        got, _ = turns(e, system, convs)
        e.wait_for_copies()
    assert got == ref
    assert "turned off" in caplog.text
    st = e.stats()
    assert st.storage_slots == 0 and st.host_slots_used > 0


def test_decode_offload_without_storage_first_request(tiny_ckpt, make_engine, reference):
    """Guards against SGLang's crash on the first request with offload on and no storage
    backend (sgl-project/sglang#20677): host-only offload, the very first request right,
    and its generated pages (not only the prompt's) copied to host while it decodes."""
    system, convs, (ref, _) = reference
    e = make_engine(tiny_ckpt, cache=tiered(decode_offload=True), **CFG)
    prompt = list(system) + convs[0][0]
    seq = e.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert seq.token_ids == ref[0][0]
    e.wait_for_copies()
    S = CFG["page_size"]
    committed = (len(prompt) + 6 - 1) // S
    assert e.stats().host_slots_used >= committed, "decode did not offload the generated pages"


@pytest.mark.parametrize("cache, msg", [
    (CacheConfig(policy="none", host_pages=8, decode_offload=True), "cache.policy=radix"),
    (CacheConfig(decode_offload=True), "needs a host tier"),
    (CacheConfig(storage="file", storage_path="/tmp/x"), "needs a host tier"),
    (CacheConfig(host_pages=8, host_gb=1.0), "not both"),
    (CacheConfig(host_pages=8, storage="file"), "cache.storage_path"),
    (CacheConfig(host_pages=8, storage="file", storage_path="/etc/hostname/sub"), "not writable"),
    (CacheConfig(host_pages=8, storage="file", storage_path="/tmp/kv-too-big", storage_gb=1e7), "GiB free"),
])
def test_impossible_tier_configs_are_refused_before_loading(cache, msg):
    """Guards against a tier combination that cannot work being found out on the first
    request (or never): each is refused by validation, naming the options."""
    with pytest.raises(V.ConfigError, match=msg):
        V.validate_cache(cache)


def test_storage_directory_of_a_live_worker_is_refused(tiny_ckpt, make_engine, tmp_path):
    """Guards against two workers writing one slot file (each believing it owns the slots):
    the second is refused at start-up, naming the option."""
    make_engine(tiny_ckpt, cache=tiered(tmp_path, storage=True), **CFG)
    with pytest.raises(V.ConfigError, match="cache.storage_path"):
        make_engine(tiny_ckpt, cache=tiered(tmp_path, storage=True), **CFG)


def test_warmup_compiles_the_tier_copies(tiny_ckpt, make_engine, reference):
    """Guards against the first copy down or the first host hit compiling inside a request's
    TTFT: after warm-up, a request that is offloaded and one served from host compile nothing."""
    from toolkit.engine import compile_cache

    system, convs, (ref, _) = reference
    e = make_engine(tiny_ckpt, cache=tiered(), **{**CFG, "max_model_len": 64, "chunk_size": 64,
                                                  "shape_buckets": "compact", "max_prefill_seqs": 1})
    e.warmup(force=True, progress=False)
    before = compile_cache.counts().compiled
    prompt = list(system) + convs[0][0]
    first = e.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    e.wait_for_copies()
    e.flush_cache()
    again = e.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert again.token_ids == first.token_ids and again.cached_tokens > 0
    assert compile_cache.counts().compiled == before, "a tier copy compiled after warm-up"
