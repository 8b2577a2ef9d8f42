"""The Mamba2 mixer (toolkit/models/mamba2.py): the chunked SSD scan against the token-by-token
reference and against transformers' BambaMixer with the same random weights.

Every non-decode call has the same shape (T=48 rows, B=6 sequences: unused slots are
zero-row sequences, unused rows padding), so each MambaArgs compiles once.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BambaConfig
from transformers.models.bamba import modeling_bamba as mb

from toolkit.models.mamba2 import MIXER_KEYS, OPTIONAL_MIXER_KEYS, MambaArgs, mixer, mixer_ref

DM, T, B = 32, 48, 6  # hidden size, rows per step, sequences per step
BASE = dict(num_heads=4, head_dim=16, state_size=8, conv_kernel=4, norm_eps=1e-5)
CASES = {  # name -> (args, with projection biases); every MambaArgs costs seconds of compiling
    "g2_q8": (MambaArgs(n_groups=2, chunk_size=8, **BASE), False),
    "g1_q16_bias_limit": (MambaArgs(n_groups=1, chunk_size=16, time_step_limit=(0.1, 0.3), **BASE), True),
}
LIMITED = "g1_q16_bias_limit"

_mixer = jax.jit(mixer, static_argnames=("args", "decode"))
_ref = jax.jit(mixer_ref, static_argnames=("args",))


def random_weights(a: MambaArgs, bias: bool, seed=0):
    rng = np.random.default_rng(seed)
    n = lambda *s, std=1.0: (rng.standard_normal(s) * std).astype(np.float32)
    I, C, H = a.intermediate_size, a.conv_dim, a.num_heads
    w = {"in_proj": n(DM, I + C + H, std=DM ** -0.5), "conv_w": n(C, a.conv_kernel, std=0.5),
         "conv_b": n(C, std=0.1),
         "dt_bias": n(H, std=0.5) - 1.5,  # dt ~ softplus(N(-1.5, ~1)): on both sides of (0.1, 0.3)
         "A_log": np.log(rng.uniform(0.05, 0.6, H)).astype(np.float32),  # slow decays: ssm0 matters for long
         "D": n(H), "norm_w": 1 + n(I, std=0.1), "out_proj": n(I, DM, std=I ** -0.5)}
    if bias:
        w["in_proj_b"], w["out_proj_b"] = n(I + C + H, std=0.1), n(DM, std=0.1)
    assert set(w) <= set(MIXER_KEYS) | set(OPTIONAL_MIXER_KEYS)
    return w


def random_states(a: MambaArgs, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    conv0 = (rng.standard_normal((B, a.conv_dim, a.conv_kernel - 1)) * scale).astype(np.float32)
    ssm0 = (rng.standard_normal((B, a.num_heads, a.head_dim, a.state_size)) * scale).astype(np.float32)
    return conv0, ssm0


def zero_states(a: MambaArgs):
    return random_states(a, scale=0.0)


def cu_of(lens):
    """cu_q_lens [B+1] for up to B sequences (the rest get zero rows)."""
    lens = list(lens) + [0] * (B - len(lens))
    assert len(lens) == B and sum(lens) <= T
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def pad_rows(x):
    return np.concatenate([x, np.zeros((T - len(x), DM), np.float32)]) if len(x) < T else x


def run(fn, w, x, conv0, ssm0, lens, a):
    """fn over the rows x (padded to T) -> numpy (y [rows], conv1, ssm1)."""
    kw = dict(args=a) if fn is _ref else dict(args=a, decode=False)
    y, c1, s1 = fn(w, pad_rows(x), conv0, ssm0, cu_of(lens), **kw)
    return np.asarray(y)[:len(x)], np.asarray(c1), np.asarray(s1)


def close(got, want, rel=1e-4):
    """Equal within rel of the reference's largest magnitude."""
    if np.size(want):
        np.testing.assert_allclose(got, want, rtol=rel, atol=rel * max(1.0, float(np.abs(want).max())))


# ---------------------------------------------------------------------------------------
# transformers


def hf_mixer(a: MambaArgs, w):
    cfg = BambaConfig(vocab_size=64, hidden_size=DM, intermediate_size=64, num_hidden_layers=2,
                      attn_layer_indices=[1], num_attention_heads=4, num_key_value_heads=2,
                      mamba_n_heads=a.num_heads, mamba_d_head=a.head_dim, mamba_n_groups=a.n_groups,
                      mamba_d_state=a.state_size, mamba_d_conv=a.conv_kernel,
                      mamba_expand=a.intermediate_size // DM, mamba_chunk_size=a.chunk_size,
                      mamba_conv_bias="conv_b" in w, mamba_proj_bias="in_proj_b" in w,
                      time_step_limit=a.time_step_limit, rms_norm_eps=a.norm_eps)
    assert cfg.layers_block_type[0] == "linear_attention"
    m = mb.BambaMixer(cfg, layer_idx=0).eval()
    t = lambda v: torch.from_numpy(np.ascontiguousarray(v))
    sd = {"in_proj.weight": t(w["in_proj"].T), "conv1d.weight": t(w["conv_w"][:, None, :]),
          "conv1d.bias": t(w["conv_b"]), "dt_bias": t(w["dt_bias"]), "A_log": t(w["A_log"]),
          "D": t(w["D"]), "norm.weight": t(w["norm_w"]), "out_proj.weight": t(w["out_proj"].T)}
    if "in_proj_b" in w:
        sd["in_proj.bias"], sd["out_proj.bias"] = t(w["in_proj_b"]), t(w["out_proj_b"])
    m.load_state_dict(sd, strict=True)
    return m


def hf_forward(m, x):
    """transformers' one-shot forward (no cache) of one sequence x [L, D]."""
    with torch.no_grad():
        return m(torch.from_numpy(x)[None])[0].numpy()


def hf_forward_from_state(m, x, ssm0):
    """BambaMixer's torch path spelled out, with an initial SSM state and its final state
    (what a cache would hold): y [L, D], ssm1 [H, P, N]."""
    L = len(x)
    H, P, G, N = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size
    with torch.no_grad():
        proj = m.in_proj(torch.from_numpy(x)[None])
        gate, xbc, dt = proj.split([m.intermediate_size, m.conv_dim, H], dim=-1)
        xbc = mb.causal_conv1d_fn(xbc.transpose(1, 2), m.conv1d.weight.squeeze(1), m.conv1d.bias,
                                  activation="silu").transpose(1, 2)
        hs, Bm, Cm = xbc.split([m.intermediate_size, G * N, G * N], dim=-1)
        y, final = mb.mamba2_chunk_scan(hs.view(1, L, H, P), dt, -torch.exp(m.A_log.float()),
                                        Bm.view(1, L, G, N), Cm.view(1, L, G, N), chunk_size=m.chunk_size,
                                        D=m.D, dt_bias=m.dt_bias, initial_states=torch.from_numpy(ssm0)[None],
                                        dt_softplus=True, dt_limit=m.time_step_limit, return_final_states=True)
        y = m.out_proj(m.norm(y.reshape(1, L, -1), gate))
    return y[0].numpy(), final[0].numpy()


# ---------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_scan_matches_reference(case):
    """Guards against the chunked SSD scan mixing sequences inside a chunk, losing the state
    carried across chunk boundaries, mishandling a sequence that starts inside a chunk (its
    ssm0 and conv0 entering, decayed from its first row), zero-row or 1-row sequences, or taking
    final states at the wrong row."""
    a, bias = CASES[case]
    w = random_weights(a, bias)
    conv0, ssm0 = random_states(a)
    rng = np.random.default_rng(7)
    for lens in ([0, 1, 19, 2, 0, 21], [5, 0, 0, 40, 1, 1], [1, 1, 1, 1, 1, 1], [45]):
        x = rng.standard_normal((sum(lens), DM)).astype(np.float32)
        got, want = run(_mixer, w, x, conv0, ssm0, lens, a), run(_ref, w, x, conv0, ssm0, lens, a)
        for g, r in zip(got, want):
            close(g, r)
        zero = [i for i in range(B) if cu_of(lens)[i + 1] == cu_of(lens)[i]]
        np.testing.assert_array_equal(got[1][zero], conv0[zero])  # zero-row sequences keep their states
        np.testing.assert_array_equal(got[2][zero], ssm0[zero])


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_bamba_mixer(case):
    """Guards against layout or math mismatches with transformers: in_proj column order (z, xBC,
    dt), conv weight orientation and bias, head-to-group mapping of B and C, softplus(dt + bias),
    A = -exp(A_log), the D skip, and the gated RMSNorm's grouping; the final SSM state against
    mamba2_chunk_scan's, from a nonzero initial state."""
    a, bias = CASES[case]
    w = random_weights(a, bias)
    m = hf_mixer(a, w)
    x = np.random.default_rng(3).standard_normal((45, DM)).astype(np.float32)
    want = hf_forward(m, x)
    conv0, ssm0 = zero_states(a)
    close(run(_ref, w, x, conv0, ssm0, [45], a)[0], want)
    close(run(_mixer, w, x, conv0, ssm0, [45], a)[0], want)

    _, ssm0 = random_states(a)  # HF's chunk scan takes an initial SSM state (its conv context is zeros)
    want_y, want_ssm = hf_forward_from_state(m, x, ssm0[0])
    y, _, ssm1 = run(_mixer, w, x, conv0, ssm0, [45], a)
    close(y, want_y)
    close(ssm1[0], want_ssm)


def test_split_prompt_equals_one_shot():
    """Guards against state handoff bugs in chunked prefill: prompts fed in random pieces (1-token
    pieces, pieces not aligned with chunk_size, sequences finishing at different steps) carrying
    conv1/ssm1 between steps must give the one-shot outputs and states, and transformers' output."""
    a, _ = CASES["g2_q8"]
    w = random_weights(a, False)
    rng = np.random.default_rng(11)
    lens = [29, 13, 1, 3]
    prompts = [rng.standard_normal((n, DM)).astype(np.float32) for n in lens]
    conv0, ssm0 = zero_states(a)
    one_y, one_conv, one_ssm = run(_mixer, w, np.concatenate(prompts), conv0, ssm0, lens, a)
    one_y = np.split(one_y, np.cumsum(lens)[:-1])

    cuts = [[0, 1, 2, 9, 10, 23, 29], [0, 5, 6, 13], [0, 0, 0, 1], [0, 1, 2, 3]]  # per sequence, per step
    conv, ssm = conv0, ssm0
    outs = [[] for _ in lens]
    for k in range(6):
        pieces = [p[c[k]:c[k + 1]] if k + 1 < len(c) else p[:0] for p, c in zip(prompts, cuts)]
        y, conv, ssm = run(_mixer, w, np.concatenate(pieces), conv, ssm, [len(p) for p in pieces], a)
        for i, part in enumerate(np.split(y, np.cumsum([len(p) for p in pieces])[:-1])):
            outs[i].append(part)
    for i in range(len(lens)):
        close(np.concatenate(outs[i]), one_y[i])
    close(conv, one_conv)
    close(ssm, one_ssm)
    m = hf_mixer(a, w)
    close(np.concatenate(outs[0]), hf_forward(m, prompts[0]))
    close(np.concatenate(outs[1]), hf_forward(m, prompts[1]))


def test_ragged_batch_equals_each_sequence_alone():
    """Guards against leakage between neighbouring sequences of one step (through the conv window,
    the in-chunk mask, the carried chunk state or the final-state sums) and against a sequence's
    result depending on its slot or row offset."""
    a, _ = CASES["g2_q8"]
    w = random_weights(a, False)
    conv0, ssm0 = random_states(a, seed=5)
    lens = [3, 0, 17, 1, 22, 2]
    x = np.random.default_rng(2).standard_normal((sum(lens), DM)).astype(np.float32)
    y, conv1, ssm1 = run(_mixer, w, x, conv0, ssm0, lens, a)
    cu = cu_of(lens)
    for i, n in enumerate(lens):
        c_i, s_i = np.roll(conv0, -i, axis=0), np.roll(ssm0, -i, axis=0)  # sequence i in slot 0, rows 0:n
        y_i, c1, s1 = run(_mixer, w, x[cu[i]:cu[i + 1]], c_i, s_i, [n], a)
        close(y[cu[i]:cu[i + 1]], y_i)
        close(conv1[i], c1[0])
        close(ssm1[i], s1[0])


def test_decode_continues_prefill():
    """Guards against the one-token path diverging from the scan: decode=True steps continuing
    from a prefill's conv1/ssm1 (a fresh sequence, a 1-row prompt, a padding sequence with zero
    rows that must keep its state) equal the one-shot run over the whole sequences and
    transformers' output."""
    a, _ = CASES["g2_q8"]
    w = random_weights(a, False)
    rng = np.random.default_rng(4)
    prompt_lens, steps = [9, 1, 0, 15, 2], 4  # slot 5: zero rows in every step
    seqs = [rng.standard_normal((n + steps, DM)).astype(np.float32) for n in prompt_lens]
    conv0, ssm0 = random_states(a, seed=9)
    prefill = np.concatenate([s[:n] for s, n in zip(seqs, prompt_lens)])
    _, conv, ssm = run(_mixer, w, prefill, conv0, ssm0, prompt_lens, a)
    cu = np.array([0, 1, 2, 3, 4, 5, 5], np.int32)
    outs = []
    for k in range(steps):
        x = np.stack([s[n + k] for s, n in zip(seqs, prompt_lens)] + [np.zeros(DM, np.float32)])
        y, conv, ssm = _mixer(w, x, conv, ssm, cu, args=a, decode=True)
        outs.append(np.asarray(y)[:5])
    np.testing.assert_array_equal(np.asarray(conv)[5], conv0[5])
    np.testing.assert_array_equal(np.asarray(ssm)[5], ssm0[5])

    full_lens = [n + steps for n in prompt_lens]
    y_full, c_full, s_full = run(_mixer, w, np.concatenate(seqs), conv0, ssm0, full_lens, a)
    ends = np.cumsum(full_lens)
    for k in range(steps):
        close(outs[k], y_full[ends - steps + k])
    close(np.asarray(conv), c_full)
    close(np.asarray(ssm), s_full)
    # transformers from a fresh state: sequence 2 had no prompt and fresh states are zeros
    fresh_conv, fresh_ssm = zero_states(a)
    _, conv, ssm = run(_mixer, w, seqs[0][:9], fresh_conv, fresh_ssm, [9], a)
    got = []
    for k in range(steps):
        x = np.zeros((B, DM), np.float32)
        x[0] = seqs[0][9 + k]
        y, conv, ssm = _mixer(w, x, conv, ssm, np.array([0, 1, 1, 1, 1, 1, 1], np.int32), args=a, decode=True)
        got.append(np.asarray(y)[0])
    close(np.stack(got), hf_forward(hf_mixer(a, w), seqs[0])[9:])


def test_time_step_limit_is_applied():
    """Guards against dt not being clamped to time_step_limit (in the scan or in decode): the
    limited case's limit binds for a good share of the tokens, and there the scan matches
    transformers (which clamps in its chunk scan) and decode matches the reference."""
    a, bias = CASES[LIMITED]
    w = random_weights(a, bias)
    x = np.random.default_rng(6).standard_normal((45, DM)).astype(np.float32)
    dt_raw = x @ w["in_proj"][:, -a.num_heads:] + w["in_proj_b"][-a.num_heads:] + w["dt_bias"]
    dt = np.logaddexp(0.0, dt_raw)  # softplus
    lo, hi = a.time_step_limit
    assert 0.15 < np.mean(dt < lo) and 0.15 < np.mean(dt > hi), "the test's dt does not exercise both limits"
    conv0, ssm0 = zero_states(a)
    close(run(_mixer, w, x, conv0, ssm0, [45], a)[0], hf_forward(hf_mixer(a, w), x))

    conv0, ssm0 = random_states(a)  # decode: one token per sequence == the reference over 1-row sequences
    yd, cd, sd = _mixer(w, x[:B], conv0, ssm0, np.arange(B + 1, dtype=np.int32), args=a, decode=True)
    yr, cr, sr = run(_ref, w, x[:B], conv0, ssm0, [1] * B, a)
    close(np.asarray(yd), yr)
    close(np.asarray(cd), cr)
    close(np.asarray(sd), sr)


def test_args_are_static_and_hashable():
    """Guards against MambaArgs that cannot be a jit static argument (unhashable, or a JSON round
    trip giving an unequal value that recompiles), and against wrong output shapes or dtypes in
    a 16-bit model (states: conv in the model dtype, SSM in float32)."""
    a, _ = CASES["g2_q8"]
    back = MambaArgs.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back == a and hash(back) == hash(a) and isinstance(back.time_step_limit, tuple)
    assert CASES[LIMITED][0] != a and a.intermediate_size == 64 and a.conv_dim == 64 + 2 * 2 * 8
    w = random_weights(a, False)
    conv0, ssm0 = zero_states(a)
    x = np.zeros((T, DM), np.float32)
    _mixer(w, x, conv0, ssm0, cu_of([T]), args=a, decode=False)
    n = _mixer._cache_size()
    _mixer(w, x, conv0, ssm0, cu_of([T]), args=back, decode=False)
    assert _mixer._cache_size() == n, "an equal MambaArgs recompiled"

    bf = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16), w)
    for decode, rows in ((False, T), (True, B)):
        y, c1, s1 = jax.eval_shape(lambda p, x, c, s, cu: mixer(p, x, c, s, cu, args=a, decode=decode), bf,
                                   jax.ShapeDtypeStruct((rows, DM), jnp.bfloat16),
                                   jax.ShapeDtypeStruct(conv0.shape, jnp.bfloat16), ssm0,
                                   np.arange(B + 1, dtype=np.int32) if decode else cu_of([rows]))
        assert (y.shape, y.dtype) == ((rows, DM), jnp.bfloat16)
        assert (c1.shape, c1.dtype) == (conv0.shape, jnp.bfloat16)
        assert (s1.shape, s1.dtype) == (ssm0.shape, jnp.float32)
