"""Hybrid models (Bamba, Mamba2ForCausalLM) loaded from a saved HF directory against
transformers' PyTorch forward: logits at every position, float32, random weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import get_backend
from tests import hybrid_models as H
from toolkit.cache.pool import PoolLayout
from toolkit.cache.state_pool import StateLayout
from toolkit.engine.inputs import StepInputs
from toolkit.models.hf_loader import load_hf_dir

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["bamba", "mamba2"])
def model_and_ckpt(request, tmp_path_factory):
    model = H.build(request.param, seed=1)
    path = H.save(model, tmp_path_factory.mktemp(request.param))
    return request.param, model, load_hf_dir(path, progress=False)


def our_logits(ckpt, ids, page_size=4, unroll=False):
    """One sequence prefilled in one ragged step, logits at every position."""
    from flax import nnx

    from toolkit.models.hybrid import Hybrid, forward

    a = ckpt.args
    graphdef, state = nnx.split(Hybrid(a, ckpt.weights, jnp.float32, unroll_layers=unroll))
    T = len(ids)
    npages = -(-T // page_size)
    pages = np.random.default_rng(0).permutation(np.arange(1, npages + 3))[:npages].astype(np.int32)
    pos = np.arange(T)
    k_pool = jnp.zeros(PoolLayout.for_model(a, npages + 3, page_size, jnp.float32).shape, jnp.float32)
    sl = StateLayout.for_model(a, 3, jnp.float32)
    # garbage in the slot: a sequence at position 0 must start from zeros whatever it holds
    mstate = (jnp.full(sl.conv_shape, 7.0, jnp.float32), jnp.full(sl.ssm_shape, -3.0, jnp.float32))
    inp = StepInputs(
        tokens=jnp.asarray(ids, jnp.int32), positions=jnp.asarray(pos, jnp.int32),
        slot_mapping=jnp.asarray(pages[pos // page_size] * page_size + pos % page_size, jnp.int32),
        page_table=jnp.asarray(pages[None]), cu_q_lens=jnp.asarray([0, T], jnp.int32),
        kv_lens=jnp.asarray([T], jnp.int32), logits_indices=jnp.asarray(pos, jnp.int32),
        state_slots=jnp.asarray([2], jnp.int32))
    logits, *_ = forward(graphdef, state, k_pool, jnp.zeros_like(k_pool), mstate, inp,
                         attn=get_backend("reference"), max_q_len=T)
    return np.asarray(logits)


def test_loader_reads_the_layer_types(model_and_ckpt):
    """Guards against a hybrid loaded as the wrong stack: attention where the config says
    Mamba2, or a Mamba2 model given KV pages."""
    kind, model, ckpt = model_and_ckpt
    a = ckpt.args
    if kind == "bamba":
        assert a.types == ("mamba", "attention", "mamba", "mamba") and a.partial_rotary_factor == 0.5
        assert a.num_attn_layers == 1 and ckpt.weights["wq"].shape[0] == 1
    else:
        assert a.num_attn_layers == 0 and not a.has_mlp and "wq" not in ckpt.weights
        assert PoolLayout.for_model(a, 8, 4, jnp.float32).total_bytes == 0
    assert a.has_state and ckpt.weights["m_in_proj"].shape[0] == a.num_mamba_layers


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unroll"])
def test_logits_match_transformers_at_every_position(model_and_ckpt, unroll):
    """Guards against any mistake in the hybrid stack (layer order, partial RoPE, the gated
    norm, the mixer's splits of in_proj, the conv layout, the tied/untied head) and
    against a slot's old contents leaking into a fresh sequence: a prompt longer than
    several scan chunks, our logits at every position against transformers', with the
    layers scanned (lax.cond per kind: the CPU default) and unrolled (the GPU default)."""
    kind, model, ckpt = model_and_ckpt
    ids = np.random.default_rng(5).integers(3, H.VOCAB, 3 * H.CHUNK + 5)
    with torch.no_grad():
        ref = model(torch.tensor(ids[None])).logits[0].numpy()
    ours = our_logits(ckpt, ids, unroll=unroll)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())
