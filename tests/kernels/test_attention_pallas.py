"""The Pallas kernels against the jnp reference, on fresh random inputs and random
non-contiguous page tables, outputs poisoned (NaN) before each run.

On CPU the kernels run in Pallas interpret mode over a small grid; the full grid
(page sizes 16/32/64, GQA 1-8, head dims 64/128, bf16 and float32, lengths up to 32k)
runs compiled on a GPU (tests marked ``gpu``, skipped on CPU).
"""

import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention, tiling
from kernels import attention_pallas as pk
from kernels import attention_ref as ref
from toolkit.cache.allocator import pages_for

ON_GPU = jax.devices()[0].platform == "gpu"
TOL = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5 if not ON_GPU else 1e-4}
LENS = [1, 3, 513, 2048]


@pytest.fixture(autouse=True)
def _compile_mgpu_interpreter_once(monkeypatch):
    """Mosaic GPU's CPU interpreter runs each grid point's threads (3 warpgroups) as one
    program, but its ``thread_map._run_jaxpr`` (JAX 0.10) lowers and XLA-compiles that
    program again for every thread of every grid point: ~6 s each, 97% of a grid point's
    time, the same for an inactive tile. The program is the same for all of them (thread id
    and grid point are its arguments), so compile it once per program and argument shapes;
    what runs, and every check the interpreter makes, is unchanged. Where the internal is
    not found (another JAX), the interpreter's own path runs, only slower."""
    try:
        from jax._src.pallas.mosaic.interpret import thread_map
    except ImportError:
        return
    if not callable(getattr(thread_map, "_run_jaxpr", None)):
        return
    compiled, lock = {}, threading.Lock()

    def _run(jaxpr, consts, *args):
        jax.core.eval_jaxpr(jaxpr, consts, *args)

    def run_jaxpr(jaxpr, consts, *args):
        leaves, tree = jax.tree.flatten((consts, args))
        key = (id(jaxpr), tree, tuple((np.shape(x), np.asarray(x).dtype.str) for x in leaves))
        with lock:  # (the first grid point's threads: one compiles, the others wait for it)
            if key not in compiled:  # (the jaxpr is kept, so its id is not reused)
                compiled[key] = jaxpr, jax.jit(_run, static_argnums=0).trace(jaxpr, consts, *args).lower().compile()
        compiled[key][1](consts, *args)

    monkeypatch.setattr(thread_map, "_run_jaxpr", run_jaxpr)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a)), "kernel output has NaN/inf (an element was never written)"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _pool(rng, lens, S, KV, D, dtype, L=2, extra=3):
    """Random pools; each sequence's KV on random non-contiguous pages of layer 1."""
    need = [pages_for(n, S) for n in lens]
    P = 1 + sum(need) + extra
    k = jnp.asarray(rng.standard_normal((P, L, S, KV, D)), dtype)
    v = jnp.asarray(rng.standard_normal((P, L, S, KV, D)), dtype)
    return k, v, jnp.asarray(ref.scattered_page_table(rng, need, P, junk=True))


def _decode_case(S, G, D, dtype, lens, KV=2, seed=0, **kw):
    rng = np.random.default_rng(seed)
    k, v, table = _pool(rng, lens, S, KV, D, dtype)
    q = jnp.asarray(rng.standard_normal((len(lens), G * KV, D)), dtype)
    kl = jnp.asarray(lens, jnp.int32)
    got = pk.paged_decode_attention(q, k, v, 1, table, kl, scale=D ** -0.5, poison=True, **kw)
    with jax.default_matmul_precision("highest"):  # XLA on GPU would use TF32 for float32
        want = ref.paged_decode_attention(q, k, v, 1, table, kl, scale=D ** -0.5)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel(got, want) < TOL[dtype]


CPU_DECODE = [(16, 1, 64, jnp.float32), (32, 4, 128, jnp.bfloat16), (64, 8, 64, jnp.float32),
              (16, 3, 64, jnp.float32)]
GPU_DECODE = list(itertools.product([16, 32, 64], [1, 2, 4, 8], [64, 128], [jnp.bfloat16, jnp.float32]))


@pytest.mark.parametrize("S,G,D,dtype", CPU_DECODE)
def test_decode_matches_reference(S, G, D, dtype):
    """Guards against wrong page gathers, GQA grouping, length masks and split merging."""
    _decode_case(S, G, D, dtype, LENS)


def test_decode_one_split_and_many_splits_agree():
    """Guards against the log-sum-exp merge (one split normalises in the kernel, many merge outside)."""
    for ns in (1, 5):
        _decode_case(16, 2, 64, jnp.float32, [3, 700, 129], num_splits=ns)


def test_decode_zero_length_rows_are_zero():
    """Padding rows of a decode batch (kv_len 0) give zeros, like the reference."""
    rng = np.random.default_rng(3)
    k, v, table = _pool(rng, [40, 1], 16, 2, 64, jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    out = pk.paged_decode_attention(q, k, v, 1, table, jnp.asarray([40, 0], jnp.int32), scale=0.125,
                                    poison=True)
    assert np.all(np.asarray(out[1]) == 0) and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.gpu
@pytest.mark.parametrize("S,G,D,dtype", GPU_DECODE)
def test_decode_matches_reference_gpu(S, G, D, dtype):
    _decode_case(S, G, D, dtype, LENS + [32768 - 5])


def _prefill_case(S, G, D, dtype, seqs, KV=2, seed=1, pad=5, **kw):
    """seqs: (kv_len, q_len) per sequence: a chunk of q_len queries after kv_len - q_len cached tokens."""
    rng = np.random.default_rng(seed)
    kv_lens = [n for n, _ in seqs] + [0]  # plus one padding sequence
    k, v, table = _pool(rng, kv_lens[:-1] + [1], S, KV, D, dtype)
    q_lens = [m for _, m in seqs]
    T = sum(q_lens) + pad
    q = jnp.asarray(rng.standard_normal((T, G * KV, D)), dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens), [sum(q_lens)]]).astype(np.int32)
    args = (q, k, v, 1, table, jnp.asarray(cu), jnp.asarray(kv_lens, jnp.int32))
    mq = max(q_lens)
    got = attention.paged_prefill_attention(*args, max_q_len=mq, scale=D ** -0.5, poison=True, **kw)
    with jax.default_matmul_precision("highest"):
        want = ref.paged_prefill_attention(*args, max_q_len=mq, scale=D ** -0.5)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel(got, want) < TOL[dtype]
    assert np.all(np.asarray(got[cu[-1]:], np.float32) == 0)


PREFILL_SEQS = [(1, 1), (3, 3), (513, 513), (2048, 131), (700, 64), (40, 1)]
CPU_PREFILL = [(16, 2, 64, jnp.float32), (64, 4, 128, jnp.bfloat16), (32, 1, 64, jnp.bfloat16)]
GPU_PREFILL = list(itertools.product([16, 32, 64], [1, 4, 8], [64, 128], [jnp.bfloat16, jnp.float32]))


@pytest.mark.parametrize("S,G,D,dtype", CPU_PREFILL)
def test_prefill_matches_reference(S, G, D, dtype):
    """Guards against ragged block cutting, causal masking over a cached prefix, padding tokens."""
    _prefill_case(S, G, D, dtype, PREFILL_SEQS)


@pytest.mark.gpu
@pytest.mark.parametrize("S,G,D,dtype", GPU_PREFILL)
def test_prefill_matches_reference_gpu(S, G, D, dtype):
    """(auto: the Mosaic GPU kernel for bfloat16, the Triton-lowered one for float32)"""
    _prefill_case(S, G, D, dtype, PREFILL_SEQS + [(4096, 2048)])  # default tiles (float32 D=128 once overflowed smem)


@pytest.mark.gpu
@pytest.mark.parametrize("S,G,D", list(itertools.product([16, 32, 64], [1, 4, 8], [64, 128])))
def test_prefill_triton_lowering_matches_reference_gpu(S, G, D):
    """The Triton-lowered prefill kernel stays correct in bfloat16 too (auto picks Mosaic GPU there)."""
    _prefill_case(S, G, D, jnp.bfloat16, PREFILL_SEQS + [(4096, 2048)], impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("seqs", [[(4096, 4096)], [(1, 1)], [(300, 3), (129, 128), (2000, 1000), (5, 5)]])
def test_prefill_mgpu_tiles_and_prefixes_gpu(seqs):
    """Guards the Mosaic GPU kernel's tiles at the benchmark's head shape: whole tiles, a
    lone token, chunks after prefixes that end mid-tile (a tile shared by two chunks)."""
    _prefill_case(16, 4, 128, jnp.bfloat16, seqs, impl="mgpu")


@pytest.mark.parametrize("S,G,D,seqs,pad", [(16, 2, 64, [(40, 40), (150, 20), (5, 5)], 5),
                                             (32, 1, 128, [(300, 3), (129, 124), (1, 1)], 0)])
def test_prefill_mgpu_matches_reference(S, G, D, seqs, pad):
    """The Mosaic GPU kernel's own code on CPU (its interpreter simulates SMEM, TMA,
    barriers and warpgroups; out-of-bounds reads raise): chunks after prefixes, tiles
    shared by two chunks, a lone token, padding rows; q of whole tiles (T = 128, read in
    place) and not (padded by the wrapper)."""
    _prefill_case(S, G, D, jnp.bfloat16, seqs, pad=pad, impl="mgpu")


def test_prefill_mgpu_poison_shows_an_unwritten_row(monkeypatch):
    """The checks above can fail: a tile the Mosaic GPU kernel skips leaves NaN rows (its
    output is written in place, so nothing else would fill them)."""
    from kernels import attention_mgpu

    tiles = attention_mgpu.aligned_tiles
    monkeypatch.setattr(attention_mgpu, "aligned_tiles",
                        lambda cu, n, t: (lambda s, b: (s, b.at[0].set(-1)))(*tiles(cu, n, t)))
    with pytest.raises(AssertionError, match="NaN"):
        _prefill_case(16, 1, 64, jnp.bfloat16, [(40, 40)], KV=1, impl="mgpu")


@pytest.mark.parametrize("KV,D,dtype", [(2, 64, jnp.float32), (3, 64, jnp.bfloat16)])
def test_write_kv_bit_exact(KV, D, dtype):
    """The pool after the in-place write equals the reference scatter, bit for bit, every layer."""
    rng = np.random.default_rng(4)
    L, P, S, T = 3, 12, 16, 37
    kp = jnp.asarray(rng.standard_normal((P, L, S, KV, D)), dtype)
    vp = jnp.asarray(rng.standard_normal((P, L, S, KV, D)), dtype)
    slots = jnp.asarray(rng.permutation(P * S)[:T], jnp.int32)  # distinct, page 0 included
    k = jnp.asarray(rng.standard_normal((T, KV, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((T, KV, D)), jnp.float32)
    want = ref.write_kv(kp, vp, 2, k, v, slots)
    got = jax.jit(pk.write_kv, donate_argnums=(0, 1))(jnp.copy(kp), jnp.copy(vp), 2, k, v, slots)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_gather_scatter_pages_bit_exact():
    """Page staging copies every layer of exactly the listed pages, both ways."""
    rng = np.random.default_rng(5)
    pool = jnp.asarray(rng.standard_normal((20, 3, 16, 3, 64)), jnp.bfloat16)
    ids = jnp.asarray(rng.permutation(np.arange(1, 20))[:7], jnp.int32)
    staged = pk.gather_pages(pool, ids, poison=True)
    np.testing.assert_array_equal(np.asarray(staged, np.float32), np.asarray(ref.gather_pages(pool, ids), np.float32))
    dst = jnp.asarray(rng.standard_normal(pool.shape), jnp.bfloat16)
    got = jax.jit(pk.scatter_pages, donate_argnums=0)(jnp.copy(dst), ids, staged)
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(ref.scatter_pages(dst, ids, staged), np.float32))


def test_prefill_blocks_never_cross_sequences():
    """The ragged block table covers every real token once and no block spans two sequences."""
    cu = jnp.asarray([0, 5, 5, 70, 71, 71], jnp.int32)
    seq, start = map(np.asarray, tiling.prefill_blocks(cu, num_blocks=-(-71 // 16) + 5, block_q=16))
    cu = np.asarray(cu)
    covered = []
    for b, s in zip(seq, start):
        e = min(s + 16, cu[b + 1])
        assert cu[b] <= s and (s < cu[b + 1] or s == e)
        covered += list(range(s, e))
    assert sorted(covered) == list(range(71))


def test_mgpu_aligned_tiles_cover_every_row_once():
    """The Mosaic GPU kernel's aligned tiles: every row of q (chunks, then the padding
    segment) is in exactly one (segment, block) tile, and the tile count bound holds for
    random ragged layouts with empty chunks and chunk ends mid-block."""
    rng, BT = np.random.default_rng(0), 128
    # jitted, as the wrapper runs it (one compile per table shape; eager, one per op: 2.5x the time)
    aligned_tiles = jax.jit(tiling.aligned_tiles, static_argnums=(1, 2))
    for _ in range(60):
        lens = rng.integers(0, 400, rng.integers(1, 6))
        T = int(lens.sum() + rng.integers(0, 300))
        cu = np.concatenate([[0], np.cumsum(lens), [T]]).astype(np.int32)
        NB = -(-T // BT) + len(lens)  # the wrapper's bound
        seg, blk = map(np.asarray, aligned_tiles(jnp.asarray(cu), NB, BT))
        owner = np.full(T, -1)
        for s, b in zip(seg, blk):
            if b < 0:
                continue
            rows = np.arange(b * BT, (b + 1) * BT)
            rows = rows[(rows >= cu[s]) & (rows < cu[s + 1])]
            assert len(rows) and np.all(owner[rows] == -1)
            owner[rows] = s
        np.testing.assert_array_equal(owner, np.searchsorted(cu[1:], np.arange(T), side="right"))


@pytest.mark.gpu
def test_pallas_kernels_compile_on_gpu_for_engine_shapes():
    """bf16 decode and prefill at the benchmark's head shape (32 heads, 8 KV, dim 128, page 16)."""
    _decode_case(16, 4, 128, jnp.bfloat16, [2048] * 8, KV=8)
    _prefill_case(16, 4, 128, jnp.bfloat16, [(4096, 4096)], KV=8, pad=0)
