"""The Mamba2 mixer (SSD layer) as pure jnp functions over a ragged, flattened batch.

Numerically the mixer of transformers' ``BambaMixer`` / ``Mamba2Mixer`` (their torch
paths: ``causal_conv1d_fn``, ``causal_conv1d_update``, ``mamba2_chunk_scan``,
``mamba2_selective_state_update``, ``BambaRMSNormGated``), written for the engine's
step layout: the step's tokens are rows of one ``[T, D]`` array and sequence ``i`` owns
rows ``cu_q_lens[i]:cu_q_lens[i+1]`` (rows from ``cu_q_lens[B]`` on are padding).
Each sequence brings its state in and gets it back:

    conv  [B, conv_dim, K-1]  model dtype   the last K-1 xBC inputs (oldest first)
    ssm   [B, H, P, N]        float32       the SSM state h

One layer's weights (``x @ W`` orientation, like ``spec.py``)::

    in_proj   [D, I + conv_dim + H]   HF in_proj.weight.T; columns: z [I], xBC [conv_dim], dt [H]
    conv_w    [conv_dim, K]           HF conv1d.weight[:, 0, :]
    conv_b    [conv_dim]              optional
    dt_bias, A_log, D  [H]            A = -exp(A_log)
    norm_w    [I]                     gated RMSNorm weight (groups of I // G)
    out_proj  [I, D]
    in_proj_b [I + conv_dim + H], out_proj_b [D]   optional

Letters: T rows, B sequences, D hidden, H heads, P head dim, N state size, G groups
(head h reads group h // (H // G)), K conv kernel, I = H*P, Q chunk length, C = conv_dim.

Three ways through the SSM, one contract:

* ``mixer(decode=False)``: the chunked SSD scan. Rows are cut into chunks of Q (T padded);
  inside a chunk the masked quadratic form (mask: same sequence and causal; decays are
  exp of differences of the cumulative sum of dt*A taken within the chunk, so float32
  keeps its precision however long the step), across chunks a ``lax.scan`` carrying
  every sequence's state ``[B, H, P, N]``: a sequence with rows in the chunk reads its
  entry state from that table (its ``ssm0`` if it starts here, else the state left by
  the previous chunk), and its row-in-chunk contributions, weighted by the decay to its
  last row in the chunk, are summed back into the table (a one-hot segment sum). The
  table after the last chunk is ``ssm1``. Memory per chunk is O(Q*Q*H + B*Q*H*max(N,P)),
  never ``[T, H, P, N]``; the segment sums cost B times the work of one dense chunk
  state, fine for the few sequences of a prefill step.
* ``mixer(decode=True)``: one token per sequence, the one-step recurrence.
* ``mixer_ref``: the same one-step recurrence scanned over every row (state loaded
  at a sequence's first row, stored after each of its rows): slow, obviously right.

Precision: the projections run in the model dtype; dt, the conv, the SSM and the
gated norm's statistics in float32 (transformers runs dt and the conv in the model
dtype; identical in float32). The conv's output is rounded to the model dtype after
the silu, as in transformers. dt is clamped to ``time_step_limit`` in every path
(transformers' one-token path skips the clamp; with the default (0, inf) that is a no-op).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

MIXER_KEYS = ("in_proj", "conv_w", "dt_bias", "A_log", "D", "norm_w", "out_proj")
OPTIONAL_MIXER_KEYS = ("conv_b", "in_proj_b", "out_proj_b")


@dataclasses.dataclass(frozen=True)
class MambaArgs:
    """Hyper-parameters of one Mamba2 mixer (hashable: a static argument of ``jax.jit``)."""

    num_heads: int  # H
    head_dim: int  # P   (H * P == intermediate_size)
    state_size: int  # N
    n_groups: int  # G   (H % G == 0)
    conv_kernel: int  # K   (d_conv)
    chunk_size: int = 256  # the SSD scan's chunk length (HF mamba_chunk_size / chunk_size)
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    norm_eps: float = 1e-6

    def __post_init__(self):
        assert self.num_heads % self.n_groups == 0, "Mamba2 needs num_heads % n_groups == 0"
        assert self.conv_kernel >= 1 and self.chunk_size >= 1
        lo, hi = self.time_step_limit  # JSON gives a list; keep the dataclass hashable
        object.__setattr__(self, "time_step_limit", (float(lo), float(hi)))

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.n_groups

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["time_step_limit"] = list(self.time_step_limit)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MambaArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "time_step_limit" in kw:
            kw["time_step_limit"] = tuple(kw["time_step_limit"])
        return cls(**kw)


# ---------------------------------------------------------------------------------------
# pieces every path shares


def _project(p, x, args: MambaArgs):
    """x [T, D] -> z [T, I], xbc [T, C], dt_raw [T, H] (model dtype)."""
    zxbcdt = x @ p["in_proj"]  # [T, I + C + H]
    if "in_proj_b" in p:
        zxbcdt = zxbcdt + p["in_proj_b"]
    I, C = args.intermediate_size, args.conv_dim
    return zxbcdt[:, :I], zxbcdt[:, I:I + C], zxbcdt[:, I + C:]


def _dt(p, dt_raw, args: MambaArgs):
    """dt [.., H] float32: softplus(dt_raw + dt_bias), clamped to time_step_limit."""
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32))
    lo, hi = args.time_step_limit
    return jnp.clip(dt, lo, hi)


def _conv_out(p, acc, dtype):
    """acc [.., C] float32 (the conv's weighted sum) -> silu(acc + bias) in the model dtype."""
    if "conv_b" in p:
        acc = acc + p["conv_b"].astype(jnp.float32)
    return jax.nn.silu(acc).astype(dtype)


def _split_xbc(xbc, args: MambaArgs):
    """xbc [.., C] (after conv) -> x [.., H, P], B [.., G, N], C [.., G, N], all float32."""
    I, GN = args.intermediate_size, args.n_groups * args.state_size
    lead = xbc.shape[:-1]
    xbc = xbc.astype(jnp.float32)
    xs = xbc[..., :I].reshape(*lead, args.num_heads, args.head_dim)
    Bm = xbc[..., I:I + GN].reshape(*lead, args.n_groups, args.state_size)
    Cm = xbc[..., I + GN:].reshape(*lead, args.n_groups, args.state_size)
    return xs, Bm, Cm


def _gate_norm_out(p, y, z, args: MambaArgs, dtype):
    """y [T, H, P] float32 (SSM output), z [T, I] -> [T, D]: gated RMSNorm, then out_proj."""
    T, I, G = y.shape[0], args.intermediate_size, args.n_groups
    h = y.reshape(T, I) * jax.nn.silu(z.astype(jnp.float32))  # [T, I]
    hg = h.reshape(T, G, I // G)
    var = jnp.mean(hg * hg, axis=-1, keepdims=True)  # [T, G, 1]
    h = (hg * jax.lax.rsqrt(var + args.norm_eps)).reshape(T, I)
    h = h.astype(dtype) * p["norm_w"].astype(dtype)
    out = h @ p["out_proj"]  # [T, D]
    if "out_proj_b" in p:
        out = out + p["out_proj_b"]
    return out.astype(dtype)


def _step(p, xbc_t, dt_t, conv, ssm, args: MambaArgs):
    """One token per sequence: the plain recurrence.

    xbc_t [b, C] model dtype (before the conv), dt_t [b, H] float32 (after _dt),
    conv [b, C, K-1], ssm [b, H, P, N] float32
    -> y [b, H, P] float32 (C.h + D x), conv' [b, C, K-1], ssm' [b, H, P, N].
    """
    R = args.heads_per_group
    window = jnp.concatenate([conv, xbc_t.astype(conv.dtype)[:, :, None]], axis=-1)  # [b, C, K]
    acc = jnp.sum(window.astype(jnp.float32) * p["conv_w"].astype(jnp.float32), axis=-1)  # [b, C]
    xs, Bm, Cm = _split_xbc(_conv_out(p, acc, xbc_t.dtype), args)  # [b,H,P], [b,G,N], [b,G,N]
    Bh, Ch = jnp.repeat(Bm, R, axis=1), jnp.repeat(Cm, R, axis=1)  # [b, H, N]: head h reads group h // R
    A = -jnp.exp(p["A_log"].astype(jnp.float32))  # [H]
    dA = jnp.exp(dt_t * A)  # [b, H]
    dBx = (dt_t[:, :, None] * xs)[..., None] * Bh[:, :, None, :]  # [b, H, P, N]
    ssm = dA[:, :, None, None] * ssm + dBx
    y = jnp.sum(ssm * Ch[:, :, None, :], axis=-1)  # [b, H, P]
    y = y + p["D"].astype(jnp.float32)[None, :, None] * xs
    return y, window[:, :, 1:], ssm


def _row_segments(cu_q_lens, T):
    """seg [T] int32: the sequence of each row (B for padding rows past cu_q_lens[B])."""
    return jnp.searchsorted(cu_q_lens[1:], jnp.arange(T, dtype=cu_q_lens.dtype), side="right").astype(jnp.int32)


# ---------------------------------------------------------------------------------------
# the chunked path


def _causal_conv(p, xbc, conv0, seg, cu_q_lens, args: MambaArgs):
    """Depthwise causal conv over each sequence's rows, conv0 as its left context.

    xbc [T, C] model dtype, conv0 [B, C, K-1], seg [T] -> silu(conv) [T, C] model dtype.
    """
    T, K = xbc.shape[0], args.conv_kernel
    nseq = conv0.shape[0]
    t = jnp.arange(T)
    start = cu_q_lens[seg]  # [T] first row of each row's sequence
    ctx = jnp.swapaxes(conv0, 1, 2)  # [B, K-1, C]
    segc = jnp.minimum(seg, nseq - 1)  # padding rows read any sequence's context (ignored)
    w = p["conv_w"].astype(jnp.float32)  # [C, K]
    acc = jnp.zeros(xbc.shape, jnp.float32)  # [T, C]
    for k in range(K):  # tap k reads row j = t - (K-1) + k
        j = t - (K - 1) + k
        v = xbc[jnp.maximum(j, 0)]  # [T, C]
        if k < K - 1:  # before its sequence's first row: context slot j - start + K-1
            m = jnp.clip(j - start + K - 1, 0, K - 2)
            v = jnp.where((j >= start)[:, None], v, ctx[segc, m].astype(xbc.dtype))
        acc = acc + v.astype(jnp.float32) * w[:, k]
    return _conv_out(p, acc, xbc.dtype)


def _new_conv_state(xbc, conv0, cu_q_lens, args: MambaArgs):
    """The last K-1 xBC inputs of concat(conv0[i], sequence i's rows): [B, C, K-1]."""
    T, K = xbc.shape[0], args.conv_kernel
    start, end = cu_q_lens[:-1], cu_q_lens[1:]  # [B]
    cols = []
    for m in range(K - 1):  # slot m holds position end - (K-1) + m
        j = end - (K - 1) + m
        from_rows = xbc[jnp.clip(j, 0, T - 1)]  # [B, C]
        from_ctx = jnp.take_along_axis(conv0, jnp.clip(j - start + K - 1, 0, K - 2)[:, None, None], axis=2)[:, :, 0]
        cols.append(jnp.where((j >= start)[:, None], from_rows.astype(conv0.dtype), from_ctx))
    if not cols:
        return conv0
    return jnp.stack(cols, axis=-1)


def _ssd_chunked(xs, dt, Bm, Cm, seg, cu_q_lens, ssm0, D, A, args: MambaArgs):
    """The chunked SSD scan over a ragged batch.

    xs [T, H, P], dt [T, H] (0 on padding rows), Bm/Cm [T, G, N] float32; seg [T];
    ssm0 [B, H, P, N] -> y [T, H, P] float32 (C.h + D x), ssm1 [B, H, P, N].
    """
    T, H, P = xs.shape
    G, N, R = args.n_groups, args.state_size, args.heads_per_group
    nseq = ssm0.shape[0]
    Q = max(1, min(args.chunk_size, T))  # one short chunk when the whole step fits
    nc = -(-T // Q)
    pad = nc * Q - T

    def chunks(a, fill=0):  # [T, ...] -> [nc, Q, ...]
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
        return a.reshape(nc, Q, *a.shape[1:])

    seq_ids = jnp.arange(nseq)
    first_row, end_row = cu_q_lens[:-1], cu_q_lens[1:]  # [B]
    causal = jnp.tril(jnp.ones((Q, Q), bool))  # [l, s]: s <= l

    def body(S, inp):
        # S [B, H, P, N]: each sequence's state before this chunk's rows (ssm0 if it has had none)
        c, x_c, dt_c, B_c, C_c, seg_c = inp  # [], [Q,H,P], [Q,H], [Q,G,N], [Q,G,N], [Q]
        c0 = c * Q  # global index of local row 0
        a = dt_c * A  # [Q, H] dt*A <= 0
        acum = jnp.cumsum(a, axis=0)  # [Q, H] inclusive, within the chunk
        aex = acum - a  # [Q, H] exclusive
        dtx = dt_c[:, :, None] * x_c  # [Q, H, P]

        # intra-chunk: y[l] += sum_{s<=l, same seq} (C_l.B_s) exp(acum[l]-acum[s]) dt_s x_s
        same = causal & (seg_c[:, None] == seg_c[None, :])  # [Q, Q]
        decay = jnp.exp(jnp.where(same[:, :, None], acum[:, None, :] - acum[None, :, :], -jnp.inf))  # [Q, Q, H]
        cb = jnp.repeat(jnp.einsum("lgn,sgn->lsg", C_c, B_c), R, axis=2)  # [Q, Q, H]
        y = jnp.einsum("lsh,shp->lhp", cb * decay, dtx)  # [Q, H, P]

        # entry: y[l] += exp(sum of a from the seq's first row in the chunk to l) C_l.S[seq]
        onehot = (seg_c[:, None] == seq_ids[None, :]).astype(jnp.float32)  # [Q, B]; padding rows all 0
        entry_row = jnp.maximum(cu_q_lens[seg_c] - c0, 0)  # [Q] local first row of each row's seq
        e = acum - aex[entry_row]  # [Q, H]
        c_sel = onehot[:, :, None, None] * C_c[:, None]  # [Q, B, G, N]
        y_in = jnp.einsum("lbgn,bgrpn->lgrp", c_sel, S.reshape(nseq, G, R, P, N)).reshape(Q, H, P)
        y = y + jnp.exp(e)[:, :, None] * y_in + D[None, :, None] * x_c

        # exit: each sequence's state after its last row in this chunk
        has = (first_row < c0 + Q) & (end_row > c0) & (end_row > first_row)  # [B]
        last = jnp.clip(end_row - 1 - c0, 0, Q - 1)  # [B] local
        first = jnp.clip(first_row - c0, 0, Q - 1)  # [B] local
        acum_last = acum[last]  # [B, H]
        member = onehot.T > 0  # [B, Q]: row s belongs to sequence b (so s <= last[b])
        w = jnp.exp(jnp.where(member[:, :, None], acum_last[:, None, :] - acum[None, :, :], -jnp.inf))  # [B, Q, H]
        # weighted segment sum; the weights go on x first so no [Q, H, P, N] outer product is formed
        wx = w.reshape(nseq, Q, G, R, 1) * dtx.reshape(1, Q, G, R, P)  # [B, Q, G, R, P]
        contrib = jnp.einsum("bsgrp,sgn->bgrpn", wx, B_c).reshape(nseq, H, P, N)  # [B, H, P, N]
        keep = jnp.exp(jnp.where(has[:, None], acum_last - aex[first], 0.0))  # [B, H]; 1 if no rows here
        S = keep[:, :, None, None] * S + contrib
        return S, y

    inp = (jnp.arange(nc), chunks(xs), chunks(dt), chunks(Bm), chunks(Cm), chunks(seg, fill=nseq))
    ssm1, y = jax.lax.scan(body, ssm0, inp)  # y [nc, Q, H, P]
    return y.reshape(nc * Q, H, P)[:T], ssm1


# ---------------------------------------------------------------------------------------
# the interface


def mixer(p: dict, x, conv0, ssm0, cu_q_lens, *, args: MambaArgs, decode: bool):
    """One Mamba2 mixer over a ragged step.

    x [T, D] (model dtype): the step's tokens, sequence i's rows are cu_q_lens[i]:cu_q_lens[i+1]
    (cu_q_lens [B+1] int32, non-decreasing; rows at or past cu_q_lens[B] are padding and their
    output is ignored; a sequence may have zero rows);
    conv0 [B, conv_dim, K-1] (model dtype): per sequence, the last K-1 xBC inputs before its first row
    (oldest first; zeros for a fresh sequence), ssm0 [B, H, P, N] float32: its SSM state.
    Returns (y [T, D] model dtype, conv1 [B, conv_dim, K-1], ssm1 [B, H, P, N] float32): the states
    after each sequence's last row (a sequence with zero rows returns its states unchanged).
    decode=True: T == B and row i is sequence i's one token (the one-step recurrence, no scan).
    """
    T, nseq = x.shape[0], conv0.shape[0]
    cu_q_lens = jnp.asarray(cu_q_lens, jnp.int32)
    z, xbc, dt_raw = _project(p, x, args)  # [T, I], [T, C], [T, H]
    dt = _dt(p, dt_raw, args)  # [T, H] float32
    if decode:
        assert T == nseq, f"decode wants one row per sequence, got T={T} for B={nseq}"
        y, conv1, ssm1 = _step(p, xbc, dt, conv0, ssm0, args)
        live = (cu_q_lens[1:] > cu_q_lens[:-1])  # [B]: padding sequences keep their state
        conv1 = jnp.where(live[:, None, None], conv1, conv0)
        ssm1 = jnp.where(live[:, None, None, None], ssm1, ssm0)
        return _gate_norm_out(p, y, z, args, x.dtype), conv1, ssm1

    seg = _row_segments(cu_q_lens, T)  # [T]
    xs, Bm, Cm = _split_xbc(_causal_conv(p, xbc, conv0, seg, cu_q_lens, args), args)
    dt = jnp.where((seg < nseq)[:, None], dt, 0.0)  # padding rows: no decay, no input
    A = -jnp.exp(p["A_log"].astype(jnp.float32))  # [H]
    y, ssm1 = _ssd_chunked(xs, dt, Bm, Cm, seg, cu_q_lens, ssm0.astype(jnp.float32),
                           p["D"].astype(jnp.float32), A, args)
    conv1 = _new_conv_state(xbc, conv0, cu_q_lens, args)
    return _gate_norm_out(p, y, z, args, x.dtype), conv1, ssm1


def mixer_ref(p, x, conv0, ssm0, cu_q_lens, *, args: MambaArgs):
    """The reference: ``mixer``'s contract computed token by token with the plain recurrence.

    One ``lax.scan`` over the rows carrying the current sequence's (conv, ssm): loaded from
    conv0/ssm0 at a sequence's first row, stored into the per-sequence tables after each of
    its rows (the last store wins). Padding rows store nothing.
    """
    T, nseq = x.shape[0], conv0.shape[0]
    cu_q_lens = jnp.asarray(cu_q_lens, jnp.int32)
    ssm0 = ssm0.astype(jnp.float32)
    z, xbc, dt_raw = _project(p, x, args)
    dt = _dt(p, dt_raw, args)
    seg = _row_segments(cu_q_lens, T)
    is_first = jnp.arange(T) == cu_q_lens[seg]  # [T]

    def row(carry, inp):
        conv, ssm, conv_tab, ssm_tab = carry  # [C, K-1], [H, P, N], [B, C, K-1], [B, H, P, N]
        xbc_t, dt_t, s, first = inp
        sc = jnp.minimum(s, nseq - 1)
        conv = jnp.where(first, conv0[sc], conv)
        ssm = jnp.where(first, ssm0[sc], ssm)
        y, conv, ssm = _step(p, xbc_t[None], dt_t[None], conv[None], ssm[None], args)
        conv, ssm = conv[0], ssm[0]
        conv_tab = conv_tab.at[s].set(conv, mode="drop")  # s == B (padding) is dropped
        ssm_tab = ssm_tab.at[s].set(ssm, mode="drop")
        return (conv, ssm, conv_tab, ssm_tab), y[0]

    init = (conv0[0], ssm0[0], conv0, ssm0)
    (_, _, conv1, ssm1), y = jax.lax.scan(row, init, (xbc, dt, seg, is_first))
    return _gate_norm_out(p, y, z, args, x.dtype), conv1, ssm1
