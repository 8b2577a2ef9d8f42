"""Llama-family decoder in Flax NNX, run as a pure function over split state.

Two layouts of the layer weights (``Llama(..., unroll_layers=...)``):
- stacked on a leading axis and scanned: one layer body is compiled whatever the
  depth (fast compiles; the CPU default);
- one array per layer and an unrolled loop: on a GPU, XLA copies each scanned layer's
  weight slice before its matmuls (read + write + read: 3x the weight traffic, measured
  12.3 ms vs 3.7 ms of roofline for an 8B decode step), so the GPU default unrolls.
The KV pool rides in the carry and is updated in place (the caller donates it).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.attention import AttentionBackend
from toolkit.engine.inputs import StepInputs
from toolkit.models.rope import apply_rope, inv_frequencies
from toolkit.models.spec import LAYER_KEYS, LAYER_LOOPS, OPTIONAL_LAYER_KEYS, ModelArgs


def rms_norm(x, w, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * w.astype(jnp.float32)).astype(x.dtype)


class Layers(nnx.Module):
    """All decoder layers, each weight stacked as [L, ...]."""

    def __init__(self, weights: dict[str, np.ndarray], dtype):
        for k in LAYER_KEYS + OPTIONAL_LAYER_KEYS:
            if k in weights:
                setattr(self, k, nnx.Param(jnp.asarray(weights[k], dtype)))


def unroll_layers(layer_loop: str, platform: str) -> bool:
    """engine.layer_loop -> per-layer arrays and an unrolled loop? (auto: on a GPU only)."""
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"engine.layer_loop={layer_loop!r}; allowed: {', '.join(LAYER_LOOPS)}")
    return layer_loop == "unroll" or (layer_loop == "auto" and platform == "gpu")


class LayerList(nnx.Module):
    """The same weights, one array per layer (attributes ``<key>_<layer>``)."""

    def __init__(self, weights: dict[str, np.ndarray], num_layers: int, dtype):
        self.num_layers = num_layers
        for k in LAYER_KEYS + OPTIONAL_LAYER_KEYS:
            if k in weights:
                for i in range(num_layers):
                    setattr(self, f"{k}_{i}", nnx.Param(jnp.asarray(weights[k][i], dtype)))

    def layer(self, i: int) -> dict[str, jax.Array]:
        return {k: getattr(self, f"{k}_{i}")[...] for k in LAYER_KEYS + OPTIONAL_LAYER_KEYS
                if hasattr(self, f"{k}_{i}")}


class Llama(nnx.Module):
    def __init__(self, args: ModelArgs, weights: dict[str, np.ndarray], dtype=jnp.float32,
                 unroll_layers: bool = False):
        self.args = args
        self.embed = nnx.Param(jnp.asarray(weights["embed"], dtype))  # [V, D]
        self.layers = LayerList(weights, args.num_layers, dtype) if unroll_layers else Layers(weights, dtype)
        self.final_norm = nnx.Param(jnp.asarray(weights["final_norm"], dtype))
        self.lm_head = None if args.tie_word_embeddings else nnx.Param(jnp.asarray(weights["lm_head"], dtype))


def _layer_params(model: Llama) -> dict[str, jax.Array]:
    return {k: getattr(model.layers, k)[...] for k in LAYER_KEYS + OPTIONAL_LAYER_KEYS
            if hasattr(model.layers, k)}


def attention_block(x, k_pool, v_pool, li, lp, inp: StepInputs, *, a: ModelArgs, attn: AttentionBackend,
                    max_q_len: int, inv_freq, rot: int):
    """``x + attention(norm(x))`` over the paged pool (this step's K/V written to layer
    ``li`` first); RoPE on the first ``rot`` dims of each head (Llama: all of them; Bamba:
    half; ``inv_freq`` from ``inv_frequencies(rot, ...)``). Returns (x, k_pool, v_pool)."""
    H, KV, Dh, T = a.num_heads, a.num_kv_heads, a.head_dim, x.shape[0]

    def rope(t):  # [T, N, Dh]
        if rot == Dh:
            return apply_rope(t, inp.positions, inv_freq)
        return jnp.concatenate([apply_rope(t[..., :rot], inp.positions, inv_freq), t[..., rot:]], axis=-1)

    h = rms_norm(x, lp["attn_norm"], a.rms_norm_eps)
    q, k, v = h @ lp["wq"], h @ lp["wk"], h @ lp["wv"]
    if "bq" in lp:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q, k = rope(q.reshape(T, H, Dh)), rope(k.reshape(T, KV, Dh))
    k_pool, v_pool = attn.write_kv(k_pool, v_pool, li, k, v.reshape(T, KV, Dh), inp.slot_mapping)
    scale = 1.0 / float(np.sqrt(Dh))
    if max_q_len == 1:
        o = attn.decode(q, k_pool, v_pool, li, inp.page_table, inp.kv_lens, scale=scale)
    else:
        o = attn.prefill(q, k_pool, v_pool, li, inp.page_table, inp.cu_q_lens, inp.kv_lens,
                         max_q_len=max_q_len, scale=scale)
    return x + o.reshape(T, H * Dh) @ lp["wo"], k_pool, v_pool


def mlp_block(x, lp, eps: float):
    """``x + swiglu(norm(x))``."""
    h = rms_norm(x, lp["mlp_norm"], eps)
    return x + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]


def forward(graphdef, state, k_pool, v_pool, inp: StepInputs, *, attn: AttentionBackend,
            max_q_len: int):
    """Run one step. Returns (logits [B, V] float32, k_pool, v_pool).

    k_pool, v_pool: [P, L, S, KV, Dh] (page-major, ``toolkit.cache.pool``), donated by callers.

    max_q_len == 1 selects the decode kernel (one token per sequence, T == B).
    """
    model: Llama = nnx.merge(graphdef, state)
    a = model.args
    inv_freq = inv_frequencies(a.head_dim, a.rope_theta, a.rope_scaling)
    x = model.embed[...][inp.tokens]  # [T, D]

    def layer(carry, lp):
        x, k_pool, v_pool, li = carry
        x, k_pool, v_pool = attention_block(x, k_pool, v_pool, li, lp, inp, a=a, attn=attn, max_q_len=max_q_len,
                                            inv_freq=inv_freq, rot=a.head_dim)
        return (mlp_block(x, lp, a.rms_norm_eps), k_pool, v_pool, li + 1), None

    carry = (x, k_pool, v_pool, jnp.int32(0))
    if isinstance(model.layers, LayerList):
        # One jitted layer called L times: traced and lowered once, not once per layer.
        # Lowered inline, every layer's Mosaic GPU prefill kernel was lowered and compiled
        # again (H200, 16 layers: 47 s per prefill shape, against 4 s for one scanned body;
        # docs/benchmarks.md "Start-up"). XLA inlines the calls: the step is the same.
        one_layer = jax.jit(layer)
        for i in range(model.layers.num_layers):
            carry, _ = one_layer(carry, model.layers.layer(i))
    else:
        carry, _ = jax.lax.scan(layer, carry, _layer_params(model))
    x, k_pool, v_pool, _ = carry
    h = rms_norm(x[inp.logits_indices], model.final_norm[...], a.rms_norm_eps)  # [B, D]
    head = model.embed[...].T if model.lm_head is None else model.lm_head[...]
    logits = jnp.dot(h, head, preferred_element_type=jnp.float32)  # [B, V]
    return logits, k_pool, v_pool
