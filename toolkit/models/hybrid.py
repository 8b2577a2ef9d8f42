"""Hybrid decoders: attention layers and Mamba2 mixers in one stack (Bamba; Mamba2 with
mixers only), run as a pure function over split state like ``llama.forward``.

A layer is ``x + mixer(norm(x))`` then, when the model has one, ``x + mlp(norm(x))``; the
mixer is grouped-query attention over the paged KV pool (RoPE on the first
``partial_rotary_factor`` of each head: Bamba rotates half) or a Mamba2 mixer
(``toolkit/models/mamba2.py``) over the request's state slot.

Layers are of two kinds. Unrolled (``engine.layer_loop``: the GPU default, see llama.py)
each kind is one jitted function called once per layer (traced once per kind; XLA inlines
the calls). Scanned (the CPU default) one ``lax.scan`` over the layers picks the kind with
``lax.cond`` and reads the layer's weights from arrays stacked per kind, so each kind is
compiled once whatever the depth (the chunked scan of a Mamba2 mixer costs seconds of XLA
compile on a CPU: unrolled, a 4-layer model took ~10 s a step shape). The KV pool holds
the attention layers only (``li`` counts them); the state pool the Mamba2 layers (``mi``).
A sequence whose first token this step is at position 0 starts from zero state whatever
its slot holds (no clearing pass: a reused slot never leaks old state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.attention import AttentionBackend
from toolkit.engine.inputs import StepInputs
from toolkit.models.llama import attention_block, mlp_block, rms_norm
from toolkit.models.mamba2 import MambaArgs, mixer
from toolkit.models.rope import inv_frequencies
from toolkit.models.spec import (ATTENTION, ATTENTION_KEYS, HYBRID_ALL_KEYS, MAMBA, MAMBA_KEYS,
                                 OPTIONAL_LAYER_KEYS, OPTIONAL_MAMBA_KEYS, ModelArgs, stack_index)


class HybridLayers(nnx.Module):
    """One array per layer and key (attributes ``<key>_<layer>``, ``layer`` counting all
    layers), read from the per-type stacked arrays of the checkpoint."""

    def __init__(self, args: ModelArgs, weights: dict[str, np.ndarray], dtype):
        self.num_layers = args.num_layers
        for k in _ALL_KEYS:
            if k not in weights:
                continue
            for i in range(args.num_layers):
                at = stack_index(args, k, i)
                if at is not None:
                    dt = jnp.float32 if k in _FLOAT32_KEYS else dtype
                    setattr(self, f"{k}_{i}", nnx.Param(jnp.asarray(weights[k][at[0]], dt)))

    def layer(self, i: int) -> dict[str, jax.Array]:
        """Layer ``i``'s weights, the mixer's without their ``m_`` prefix."""
        out = {}
        for name in vars(self):
            key, _, idx = name.rpartition("_")
            if key and idx == str(i):
                out[key.removeprefix("m_")] = getattr(self, name)[...]
        return out


_ALL_KEYS = HYBRID_ALL_KEYS + ATTENTION_KEYS + OPTIONAL_LAYER_KEYS + MAMBA_KEYS + OPTIONAL_MAMBA_KEYS
_FLOAT32_KEYS = ("m_A_log", "m_D", "m_dt_bias")  # the state-space parameters stay float32


class StackedLayers(nnx.Module):
    """The checkpoint's arrays as they are, stacked per kind (``spec.py``): for the scan."""

    def __init__(self, weights: dict[str, np.ndarray], dtype):
        for k in _ALL_KEYS:
            if k in weights:
                setattr(self, k, nnx.Param(jnp.asarray(weights[k], jnp.float32 if k in _FLOAT32_KEYS else dtype)))

    def params(self) -> dict[str, jax.Array]:
        return {k: getattr(self, k)[...] for k in _ALL_KEYS if hasattr(self, k)}


class Hybrid(nnx.Module):
    def __init__(self, args: ModelArgs, weights: dict[str, np.ndarray], dtype=jnp.float32,
                 unroll_layers: bool = False):
        self.args = args
        self.mamba_args = MambaArgs.from_dict(args.mamba)  # hashable: a static argument
        self.embed = nnx.Param(jnp.asarray(weights["embed"], dtype))  # [V, D]
        self.layers = HybridLayers(args, weights, dtype) if unroll_layers else StackedLayers(weights, dtype)
        self.final_norm = nnx.Param(jnp.asarray(weights["final_norm"], dtype))
        self.lm_head = None if args.tie_word_embeddings else nnx.Param(jnp.asarray(weights["lm_head"], dtype))


def forward(graphdef, state, k_pool, v_pool, mstate, inp: StepInputs, *, attn: AttentionBackend,
            max_q_len: int):
    """Run one step. Returns (logits [B, V] float32, k_pool, v_pool, mstate).

    k_pool, v_pool: [P, La, S, KV, Dh] (the attention layers); mstate = (conv [R, Lm, C, K-1],
    ssm [R, Lm, H, P, N] float32), the state pool; all donated by callers.
    inp.state_slots [B]: each sequence's slot (padding sequences: slot 0).
    max_q_len == 1 selects the decode kernel and the one-step recurrence (T == B).
    """
    model: Hybrid = nnx.merge(graphdef, state)
    a, m = model.args, model.mamba_args
    rot = int(a.head_dim * a.partial_rotary_factor)  # RoPE on the first `rot` dims of each head
    inv_freq = inv_frequencies(rot, a.rope_theta, a.rope_scaling) if a.num_attn_layers else None
    decode = max_q_len == 1
    x = model.embed[...][inp.tokens]  # [T, D]
    q_lens = inp.cu_q_lens[1:] - inp.cu_q_lens[:-1]  # [B]
    fresh = (inp.kv_lens - q_lens) == 0  # [B] first token at position 0: start from zero state
    slots = inp.state_slots

    def mlp(x, lp):
        return mlp_block(x, lp, a.rms_norm_eps) if a.has_mlp else x

    def attention_layer(x, k_pool, v_pool, li, lp):  # (the Llama block, partial RoPE)
        x, k_pool, v_pool = attention_block(x, k_pool, v_pool, li, lp, inp, a=a, attn=attn, max_q_len=max_q_len,
                                            inv_freq=inv_freq, rot=rot)
        return mlp(x, lp), k_pool, v_pool

    def mamba_layer(x, conv, ssm, mi, lp):
        h = rms_norm(x, lp["attn_norm"], a.rms_norm_eps)
        conv0 = jnp.where(fresh[:, None, None], 0, conv[slots, mi])  # [B, C, K-1]
        ssm0 = jnp.where(fresh[:, None, None, None], 0, ssm[slots, mi])  # [B, H, P, N]
        y, conv1, ssm1 = mixer(lp, h, conv0, ssm0, inp.cu_q_lens, args=m, decode=decode)
        # padding sequences (slot 0) write the padding slot; real slots are distinct
        conv = conv.at[slots, mi].set(conv1.astype(conv.dtype))
        ssm = ssm.at[slots, mi].set(ssm1)
        return mlp(x + y, lp), conv, ssm

    conv, ssm = mstate
    if isinstance(model.layers, StackedLayers):
        x, k_pool, v_pool, conv, ssm = _scan_layers(a, model.layers.params(), (x, k_pool, v_pool, conv, ssm),
                                                    attention_layer, mamba_layer)
    else:
        one_attention, one_mamba = jax.jit(attention_layer), jax.jit(mamba_layer)
        li = mi = 0
        for i, kind in enumerate(a.types):
            lp = model.layers.layer(i)
            if kind == ATTENTION:
                x, k_pool, v_pool = one_attention(x, k_pool, v_pool, jnp.int32(li), lp)
                li += 1
            else:
                assert kind == MAMBA
                x, conv, ssm = one_mamba(x, conv, ssm, jnp.int32(mi), lp)
                mi += 1
    h = rms_norm(x[inp.logits_indices], model.final_norm[...], a.rms_norm_eps)  # [B, D]
    head = model.embed[...].T if model.lm_head is None else model.lm_head[...]
    logits = jnp.dot(h, head, preferred_element_type=jnp.float32)  # [B, V]
    return logits, k_pool, v_pool, (conv, ssm)


def _scan_layers(a: ModelArgs, w: dict[str, jax.Array], carry, attention_layer, mamba_layer):
    """One ``lax.scan`` over the layers: layer i reads row i of the all-layer keys and row
    ``ordinal[i]`` (its index among the layers of its kind) of its kind's keys; the kind
    picks the branch (both compiled once). carry: (x, k_pool, v_pool, conv, ssm)."""
    kinds = np.asarray([t == MAMBA for t in a.types], np.int32)  # [L] 1: Mamba2 layer
    ordinal = np.asarray([a.types[:i].count(t) for i, t in enumerate(a.types)], np.int32)  # [L]
    attn_keys = [k for k in ATTENTION_KEYS + OPTIONAL_LAYER_KEYS if k in w]
    mamba_keys = [k for k in MAMBA_KEYS + OPTIONAL_MAMBA_KEYS if k in w]

    def body(carry, xs):
        i, is_mamba, j = xs
        shared = {k: w[k][i] for k in HYBRID_ALL_KEYS if k in w}

        def attention(c):
            x, kp, vp, conv, ssm = c
            x, kp, vp = attention_layer(x, kp, vp, j, shared | {k: w[k][j] for k in attn_keys})
            return x, kp, vp, conv, ssm

        def mamba(c):
            x, kp, vp, conv, ssm = c
            x, conv, ssm = mamba_layer(x, conv, ssm, j, shared | {k.removeprefix("m_"): w[k][j] for k in mamba_keys})
            return x, kp, vp, conv, ssm

        if not attn_keys:  # Mamba2: mixers only
            return mamba(carry), None
        return jax.lax.cond(is_mamba == 1, mamba, attention, carry), None

    carry, _ = jax.lax.scan(body, carry, (jnp.arange(a.num_layers, dtype=jnp.int32), kinds, ordinal))
    return carry
