"""The engine on hybrid models (Bamba: attention + Mamba2; Mamba2: mixers only) loaded
from saved HF directories: greedy tokens equal transformers' ``generate``, under chunked
prefill, ragged batches joining a running batch, overlap on and off, and preemption; the
state pool's slots are all free again after every scenario (the make_engine fixture)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tests import hybrid_models as H
from tests.conftest import engine_cfg
from toolkit.config import validate as V
from toolkit.config.schema import CacheConfig, ModelConfig
from toolkit.engine.request import SamplingParams

pytest.importorskip("transformers")

NEW = 10
# one small family of step shapes for every test here (compact buckets: one page-table
# width, one prefill sequence count; prefill T in {4, 8}, decode B in {4, 8}), so each shape
# compiles once per model (later engines load it from the step store): a hybrid step
# costs seconds of XLA compile on a CPU
BASE = dict(page_size=8, max_model_len=64, chunk_size=8, shape_buckets="compact", max_batch_size=8)
MIN_MARGIN = 1e-3  # float32 differences are ~1e-5: a smaller top-2 margin could flip a token


@pytest.fixture(scope="module", params=["bamba", "mamba2"])
def hybrid(request, tmp_path_factory):
    """(kind, transformers model, its HF directory, our checkpoint, prompts, HF greedy tokens)."""
    from toolkit.models.hf_loader import load_hf_dir

    model = H.build(request.param, seed={"bamba": 3, "mamba2": 9}[request.param])  # (clear margins)
    path = H.save(model, tmp_path_factory.mktemp(request.param))
    rng = np.random.default_rng(11)
    # ragged: shorter and longer than a scan chunk and than engine.chunk_size below, a 1-token prompt
    lens = [1, 5, 17, 40, 23, 9]
    prompts = [rng.integers(3, H.VOCAB, n).tolist() for n in lens]
    ref = []
    for p in prompts:
        toks, margin = H.hf_greedy(model, p, NEW)
        assert margin > MIN_MARGIN, f"near tie in the reference (margin {margin}); pick another seed"
        ref.append(toks)
    return request.param, model, path, load_hf_dir(path, progress=False), prompts, ref


def greedy(n=NEW):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("overlap", [True, False])
def test_greedy_equals_transformers(hybrid, make_engine, overlap):
    """Guards against state carried wrongly between prefill chunks (chunk_size 8: prompts
    split mid-scan-chunk, 1-token chunks), against one sequence's state leaking into
    another's in a ragged batch, and against the decode recurrence disagreeing with the
    prefill scan: all prompts at once, tokens equal transformers' generate."""
    kind, _, _, ckpt, prompts, ref = hybrid
    e = make_engine(ckpt, **BASE, overlap_schedule=overlap)
    outs = e.generate(prompts, greedy())
    assert [o.token_ids for o in outs] == ref
    # the step's shapes stay the bucket set's (state pool arguments, two layer kinds) under
    # another mix of the same prompts
    assert [o.token_ids for o in e.generate(prompts[::-1], greedy())] == ref[::-1]
    assert e.stats().num_compilations <= e.stats().max_compilations
    st = e.stats()
    assert st.state_slots == e.cfg.max_batch_size and st.state_slots_free == st.state_slots  # (+ padding)


def test_requests_joining_a_running_batch(hybrid, make_engine):
    """Guards against a new request's admission disturbing running ones' state slots (or
    starting from a previous request's slot contents: slots are reused, never cleared)."""
    kind, _, _, ckpt, prompts, ref = hybrid
    e = make_engine(ckpt, **BASE)
    seqs = [e.add_request(prompts[0], greedy()), e.add_request(prompts[1], greedy())]
    for p in prompts[2:]:
        for _ in range(3):
            e.step()
        seqs.append(e.add_request(p, greedy()))
    e.run_until_done()
    assert [s.output_ids for s in seqs] == ref


def test_preemption_recomputes_state_from_zero(hybrid, make_engine):
    """Guards against a preempted request resuming on stale state: a pool so small that
    decode preempts, and every answer still equals transformers'."""
    kind, _, _, ckpt, prompts, ref = hybrid
    e = make_engine(ckpt, **BASE, num_pages=16)  # 15 pages of 8 tokens for 19 pages of work
    outs = e.generate(prompts[2:], greedy())
    assert [o.token_ids for o in outs] == ref[2:]
    assert e.stats().num_preemptions > 0, "the pool was meant to force preemption"


def test_state_slots_below_the_requirement_are_raised(hybrid, make_engine, caplog):
    """Guards against SGLang's capped state pool (sgl-project/sglang#22462): a configured
    size below what the role can hold at once is raised, with a warning naming both
    numbers, and a full batch then never fails an allocation."""
    kind, _, _, ckpt, prompts, ref = hybrid
    with caplog.at_level(logging.WARNING, logger="toolkit.engine.engine"):
        e = make_engine(ckpt, **BASE, state_slots=2)
    assert "engine.state_slots=2" in caplog.text and "raised to 9" in caplog.text
    assert e.stats().state_slots == 8  # max_batch_size (+ the padding slot)
    outs = e.generate(prompts, greedy())  # six requests at once: every one holds a slot
    assert [o.token_ids for o in outs] == ref


def test_admission_waits_for_a_free_slot(hybrid, make_engine):
    """Guards against an assertion (or a shared slot) when every state slot is taken: the
    scheduler leaves the request waiting until one is released."""
    kind, _, _, ckpt, prompts, ref = hybrid
    e = make_engine(ckpt, **{**BASE, "max_batch_size": 2})
    seqs = [e.add_request(p, greedy()) for p in prompts[:4]]
    e.step()
    assert e.stats().running == 2 and e.stats().waiting == 2 and e.stats().state_slots_free == 0
    e.run_until_done()
    assert [s.output_ids for s in seqs] == ref[:4]


def test_prefix_cache_with_state_is_refused(hybrid):
    """Guards against serving a cached prefix without the recurrent state it needs: radix
    with a hybrid model fails at start-up, before loading weights, naming both options."""
    kind, _, path, ckpt, *_ = hybrid
    from toolkit.engine.engine import Engine

    cfg = ModelConfig(name=kind, source="hf", path=str(path), dtype="float32")
    with pytest.raises(V.ConfigError, match=r"cache.policy=radix.*" + kind):
        Engine.from_config(cfg, engine_cfg(), cache=CacheConfig(policy="radix"))
    with pytest.raises(V.ConfigError, match="cache=none"):
        V.validate_model_cache(ckpt.args, CacheConfig(policy="radix"))
