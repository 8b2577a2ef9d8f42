"""P/D with hybrid models (Bamba; Mamba2 with no attention layer) on both backends: the
request's recurrent state moves in the last transfer, with the aux record; the make_pair
fixture checks pages, aux slots and state slots are all free on both sides afterwards."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests import hybrid_models as H
from tests.disagg.conftest import edge_params, edge_prompts
from tests.disagg.test_protocol import settle
from toolkit.cache.state_pool import StateLayout
from toolkit.config.schema import CacheConfig
from toolkit.disagg.transfer import LayoutMismatch, check_state_layouts
from toolkit.engine.engine import Engine

pytest.importorskip("transformers")

# compact step shapes (one page-table width, one prefill count): each compiles once
EKW = dict(shape_buckets="compact", max_model_len=128, max_batch_size=8)
N = 8


@pytest.fixture(scope="module", params=["bamba", "mamba2"])
def hybrid_dir(request, tmp_path_factory):
    return H.save(H.build(request.param, seed=4), tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def hybrid_ckpt(hybrid_dir):
    from toolkit.models.hf_loader import load_hf_dir

    return load_hf_dir(hybrid_dir, progress=False)


@pytest.fixture(scope="module")
def reference(hybrid_ckpt):
    """The unified engine's tokens for the edge-case prompts (the P/D answer must equal them)."""
    from tests.conftest import engine_cfg
    from tests.disagg.conftest import CHUNK, PAGE

    prompts, params = edge_prompts(N, seed=2), edge_params(N)
    e = Engine(hybrid_ckpt, engine_cfg(page_size=PAGE, chunk_size=CHUNK, **EKW), cache=CacheConfig(policy="none"))
    return prompts, params, [o.token_ids for o in e.generate(prompts, params)]


def test_pd_equals_unified_and_state_rides_the_last_transfer(hybrid_ckpt, reference, make_pair):
    """Guards against decode starting from a state prefill never sent (or sent early, before
    the last chunk was computed): concurrent edge-case prompts (1 token, page-aligned,
    several chunks, an answer from the aux record alone) equal the unified engine's, each
    room listing exactly one state slot; a Mamba2 room moves no KV bytes at all."""
    prompts, params, ref = reference
    pair = make_pair(hybrid_ckpt, **EKW)
    metas = []
    send = pair.decode.control.send
    pair.decode.control.send = lambda peer, m: (metas.append(m) if m.get("type") == "room_meta" else None,
                                                send(peer, m))[1]
    got = pair.generate(prompts, params)
    assert [g.token_ids for g in got] == ref
    assert metas and all(len(m["state_slots"]) == 1 and m["state_slots"][0] > 0 for m in metas)
    if hybrid_ckpt.args.num_attn_layers == 0:
        assert pair.prefill.stats["transfer_bytes"] == 0, "a Mamba2 room moved KV pages"


def test_zeroing_decode_state_changes_the_tokens(hybrid_ckpt, reference, make_pair):
    """Negative control, proof that the state really moved: zero decode's state slot just
    before the request is admitted, and the tokens change."""
    prompts, params, ref = reference
    pair = make_pair(hybrid_ckpt, **EKW)
    dec = pair.decode.engine
    zero = jax.jit(lambda b, s: b.at[s].set(0), donate_argnums=0)
    admit = dec.add_prefilled

    def add_prefilled(seq, pages, token, logprob, prefix_node=None, reservation=None):
        slot = dec.reserved_state_slots(reservation)[0]
        sp = dec.state_pool
        sp.conv, sp.ssm = zero(sp.conv, slot), zero(sp.ssm, slot)  # donated: the pool stays put
        return admit(seq, pages, token, logprob, prefix_node=prefix_node, reservation=reservation)

    dec.add_prefilled = add_prefilled
    long = [i for i, p in enumerate(prompts) if len(p) > 10 and params[i].max_new_tokens > 3]
    got = pair.generate([prompts[i] for i in long], [params[i] for i in long])
    assert [g.token_ids for g in got] != [ref[i] for i in long]


def test_faults_free_every_state_slot(hybrid_ckpt, reference, make_pair):
    """Guards against a failed room keeping its state slot on either side (the fixture then
    finds the state pool short): injected faults fail some rooms, the rest still equal the
    unified engine, and after quarantine every page, aux slot and state slot is free."""
    prompts, params, ref = reference
    pair = make_pair(hybrid_ckpt, tcfg_kw=dict(fault_rate=0.3, fault_seed=2, quarantine_s=0.3, checksum=True), **EKW)
    got = pair.generate(prompts, params)
    failed = [g for g in got if isinstance(g, str)]
    assert 0 < len(failed) < len(prompts) and all("injected transfer fault" in g for g in failed)
    for g, want in zip(got, ref):
        if not isinstance(g, str):
            assert g.token_ids == want
    settle(pair)


def test_dense_rooms_send_no_state_slot(tiny_ckpt, make_pair):
    """Regression test for sgl-project/sglang#25699 (every dense-model request hung waiting
    for state): a model without state lists state_slots=[] and its rooms complete."""
    from tests.disagg.conftest import unified_reference

    prompts, params = edge_prompts(4, seed=5), edge_params(4)
    pair = make_pair(tiny_ckpt)
    metas = []
    send = pair.decode.control.send
    pair.decode.control.send = lambda peer, m: (metas.append(m) if m.get("type") == "room_meta" else None,
                                                send(peer, m))[1]
    got = pair.generate(prompts, params)
    assert [g.token_ids for g in got] == unified_reference(tiny_ckpt, prompts, params)
    assert metas and all(m["state_slots"] == [] for m in metas)


def test_state_layouts_must_agree_at_handshake(hybrid_ckpt):
    """Guards against moving state between pools of different shapes (or into a worker
    without state): the handshake's check names both values."""
    import jax.numpy as jnp

    mine = StateLayout.for_model(hybrid_ckpt.args, 4, jnp.float32)
    assert check_state_layouts(mine, mine.to_json()) == mine
    assert check_state_layouts(None, None) is None
    with pytest.raises(LayoutMismatch, match="a recurrent-state pool here and none on the peer"):
        check_state_layouts(mine, None)
    with pytest.raises(LayoutMismatch, match="none here and a recurrent-state pool on the peer"):
        check_state_layouts(None, mine.to_json())
    other = StateLayout(**{**mine.to_json(), "addresses": (), "state_size": mine.state_size * 2})
    with pytest.raises(LayoutMismatch, match=f"state_size is {mine.state_size} here and {2 * mine.state_size}"):
        check_state_layouts(mine, other.to_json())
    np.testing.assert_equal(mine.slot_bytes[1], mine.num_layers * mine.num_heads * mine.head_dim * mine.state_size * 4)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("hybrid_dir", ["bamba"], indirect=True)  # (Bamba moves pages and state)
def test_two_processes_move_state_over_nixl(hybrid_dir, hybrid_ckpt, reference):
    """Guards against what only breaks across processes: state-pool addresses registered in
    one process and written from another, the state layout in the serialised handshake, the
    state slot in the room metadata. Real prefill and decode workers (``python -m serve``)
    over NIXL on loopback: tokens equal the unified engine's, every slot free afterwards."""
    from tests.disagg.procs import Worker, run_concurrently
    from tests.disagg.test_processes import as_dict

    prompts, params, ref = reference
    engine = ["model=hf", f"model.path={hybrid_dir}", "model.name=bamba-tiny", "model.dtype=float32", "cache=none",
              "engine.page_size=4", "engine.chunk_size=16", "engine.num_pages=256", "engine.max_prefill_seqs=4",
              "engine.min_bucket=4", "engine.attention_backend=reference", "engine.shape_buckets=compact",
              "engine.max_model_len=128", "engine.max_batch_size=8", "transfer.checksum=true"]
    made = []
    try:
        pre = Worker("prefill", engine=engine)
        made.append(pre)
        dec = Worker("decode", engine=engine)
        made.append(dec)
        got = run_concurrently(pre, dec, prompts, [as_dict(p) for p in params])
        assert [g.get("tokens") if "error" not in g else g["error"] for g in got] == ref
        for w in (pre, dec):
            st = w.wait_idle()
            assert st["state_slots"] > 0 and st["state_slots_free"] == st["state_slots"]
    finally:
        for w in made:
            w.stop()
