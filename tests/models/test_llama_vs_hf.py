"""Our NNX Llama forward against HF transformers' LlamaForCausalLM with the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from kernels.attention import REFERENCE
from toolkit.cache.allocator import pages_for
from toolkit.cache.pool import PoolLayout
from toolkit.engine.inputs import StepInputs
from toolkit.models.llama import Llama, forward
from toolkit.models.spec import ModelArgs, check_weights


def random_weights(a: ModelArgs, seed=0):
    rng = np.random.default_rng(seed)
    L, D, F, V = a.num_layers, a.hidden_size, a.intermediate_size, a.vocab_size
    qd, kd = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    n = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)
    w = {"embed": n(V, D), "final_norm": 1 + n(D), "attn_norm": 1 + n(L, D), "mlp_norm": 1 + n(L, D),
         "wq": n(L, D, qd), "wk": n(L, D, kd), "wv": n(L, D, kd), "wo": n(L, qd, D),
         "w_gate": n(L, D, F), "w_up": n(L, D, F), "w_down": n(L, F, D)}
    if not a.tie_word_embeddings:
        w["lm_head"] = n(D, V)
    check_weights(a, w)
    return w


def hf_model(a: ModelArgs, w):
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
                      num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim, rope_theta=a.rope_theta,
                      rope_scaling=a.rope_scaling, rms_norm_eps=a.rms_norm_eps,
                      tie_word_embeddings=a.tie_word_embeddings,
                      max_position_embeddings=a.max_position_embeddings)
    m = LlamaForCausalLM(cfg).eval()
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))
    sd = {"model.embed_tokens.weight": t(w["embed"]), "model.norm.weight": t(w["final_norm"])}
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
             "w_down": "mlp.down_proj"}
    for i in range(a.num_layers):
        sd[f"model.layers.{i}.input_layernorm.weight"] = t(w["attn_norm"][i])
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = t(w["mlp_norm"][i])
        for k, hf in names.items():
            sd[f"model.layers.{i}.{hf}.weight"] = t(w[k][i].T)
    sd["lm_head.weight"] = t(w["lm_head"].T) if "lm_head" in w else sd["model.embed_tokens.weight"]
    m.load_state_dict(sd, strict=False)
    return m


def our_logits_all_positions(a, w, ids, page_size=4):
    """Prefill the whole sequence in one ragged step, asking for logits at every position."""
    graphdef, state = nnx.split(Llama(a, w, jnp.float32))
    T = len(ids)
    npages = pages_for(T, page_size)
    P = npages + 2
    pages = np.random.default_rng(0).permutation(np.arange(1, P))[:npages].astype(np.int32)
    pos = np.arange(T)
    k_pool = jnp.zeros(PoolLayout.for_model(a, P, page_size, jnp.float32).shape, jnp.float32)  # the engine's layout
    inp = StepInputs(
        tokens=jnp.asarray(ids, jnp.int32), positions=jnp.asarray(pos, jnp.int32),
        slot_mapping=jnp.asarray(pages[pos // page_size] * page_size + pos % page_size, jnp.int32),
        page_table=jnp.asarray(np.tile(pages, (T, 1))), cu_q_lens=jnp.asarray(np.arange(T + 1), jnp.int32),
        kv_lens=jnp.asarray(pos + 1, jnp.int32), logits_indices=jnp.asarray(pos, jnp.int32),
        state_slots=jnp.zeros(T, jnp.int32))
    # T sequences that share the same pages: sequence t's single query is token t.
    logits, _, _ = forward(graphdef, state, k_pool, jnp.zeros_like(k_pool), inp, attn=REFERENCE,
                           max_q_len=2)
    return np.asarray(logits)


@pytest.mark.parametrize("variant", ["tied", "untied_llama3_rope", "mha_linear_rope"])
def test_forward_logits_match_hf(variant):
    """Guards against RoPE order/scaling, GQA, norm or tied-head mistakes in the model definition."""
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                max_position_embeddings=512)
    if variant == "untied_llama3_rope":
        base.update(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if variant == "mha_linear_rope":
        base.update(num_kv_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0})
    a = ModelArgs(**base)
    w = random_weights(a)
    ids = np.random.default_rng(3).integers(0, a.vocab_size, 23)
    ours = our_logits_all_positions(a, w, ids)
    with torch.no_grad():
        theirs = hf_model(a, w)(torch.from_numpy(ids[None])).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-4)
