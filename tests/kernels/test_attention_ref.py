"""The jnp paged-attention reference against dense attention on contiguous K/V."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention_ref as ref
from toolkit.cache.allocator import pages_for


# Jitted, as the engine runs them: one compile per shape (eager, one per op: most of these tests' time).
paged_decode = jax.jit(ref.paged_decode_attention, static_argnames="scale")
paged_prefill = jax.jit(ref.paged_prefill_attention, static_argnames=("max_q_len", "scale"))
dense = jax.jit(ref.dense_causal_attention, static_argnames="scale")


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """float32 matmuls in full precision (XLA on a GPU would use TF32: 4e-4 off)."""
    with jax.default_matmul_precision("highest"):
        yield


def _setup(rng, lens, page_size, KV, Dh, L=2, extra_pages=3, dtype=np.float32):
    """Random pool with each sequence's KV on random non-contiguous pages of layer 1."""
    need = [pages_for(n, page_size) for n in lens]
    P = 1 + sum(need) + extra_pages
    k_pool = rng.standard_normal((P, L, page_size, KV, Dh)).astype(dtype)
    v_pool = rng.standard_normal((P, L, page_size, KV, Dh)).astype(dtype)
    return k_pool, v_pool, ref.scattered_page_table(rng, need, P)


def _contig(pool, layer, table_row, n):
    return pool[table_row, layer].reshape(-1, *pool.shape[3:])[:n]


@pytest.mark.parametrize("page_size,H,KV,Dh", [(4, 4, 2, 16), (16, 8, 1, 32), (8, 6, 6, 8)])
def test_decode_matches_dense(page_size, H, KV, Dh):
    """Guards against wrong page indexing, GQA head grouping or length masking in decode."""
    rng = np.random.default_rng(0)
    lens = [1, 3, page_size, 2 * page_size + 1, 37]
    k_pool, v_pool, table = _setup(rng, lens, page_size, KV, Dh)
    q = rng.standard_normal((len(lens), H, Dh)).astype(np.float32)
    out = paged_decode(jnp.asarray(q), k_pool, v_pool, 1, jnp.asarray(table),
                                     jnp.asarray(lens, jnp.int32), scale=Dh ** -0.5)
    for b, n in enumerate(lens):
        k, v = _contig(k_pool, 1, table[b], n), _contig(v_pool, 1, table[b], n)
        want = dense(q[b:b + 1], k, v, scale=Dh ** -0.5)
        np.testing.assert_allclose(np.asarray(out[b]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_prefill_ragged_matches_dense(page_size):
    """Guards against wrong ragged offsets, causal masking across a cached prefix, and padding rows."""
    rng = np.random.default_rng(1)
    H, KV, Dh = 4, 2, 16
    kv_lens = [5, 1, 40, 17]
    q_lens = [5, 1, 9, 3]  # first two are whole prompts; others are chunks after a prefix
    k_pool, v_pool, table = _setup(rng, kv_lens, page_size, KV, Dh)
    T = sum(q_lens) + 6  # padding tokens at the end
    q = rng.standard_normal((T, H, Dh)).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu = np.concatenate([cu, [cu[-1]]])  # one padding sequence
    table = np.concatenate([table, np.zeros((1, table.shape[1]), np.int32)])
    kvl = np.asarray(kv_lens + [0], np.int32)
    out = np.asarray(paged_prefill(jnp.asarray(q), k_pool, v_pool, 1, table, cu, kvl,
                                                 max_q_len=16, scale=Dh ** -0.5))
    for b, (n, m) in enumerate(zip(kv_lens, q_lens)):
        k, v = _contig(k_pool, 1, table[b], n), _contig(v_pool, 1, table[b], n)
        want = dense(q[cu[b]:cu[b + 1]], k, v, scale=Dh ** -0.5)
        np.testing.assert_allclose(out[cu[b]:cu[b + 1]], np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.all(out[cu[-1]:] == 0) and np.all(np.isfinite(out))


def test_write_kv_then_gather_scatter_pages_roundtrip():
    """Guards against slot arithmetic errors and page staging that mixes layers or pages."""
    rng = np.random.default_rng(2)
    L, P, S, KV, Dh = 3, 9, 4, 2, 8
    k_pool = jnp.asarray(rng.standard_normal((P, L, S, KV, Dh)), jnp.float32)
    v_pool = jnp.asarray(rng.standard_normal((P, L, S, KV, Dh)), jnp.float32)
    slots = np.asarray([5 * S + 0, 5 * S + 3, 2 * S + 1], np.int32)
    k_new = rng.standard_normal((3, KV, Dh)).astype(np.float32)
    k2, v2 = ref.write_kv(k_pool, v_pool, 2, jnp.asarray(k_new), jnp.asarray(-k_new), slots)
    np.testing.assert_array_equal(np.asarray(k2[5, 2, 3]), k_new[1])
    np.testing.assert_array_equal(np.asarray(v2[2, 2, 1]), -k_new[2])
    np.testing.assert_array_equal(np.asarray(k2[:, :2]), np.asarray(k_pool[:, :2]))  # other layers untouched
    np.testing.assert_array_equal(np.asarray(k2[5, 2, 1]), np.asarray(k_pool[5, 2, 1]))  # other slots untouched
    pages = jnp.asarray([5, 2, 7], jnp.int32)
    staged = ref.gather_pages(k2, pages)  # [3, L, S, KV, Dh]
    np.testing.assert_array_equal(np.asarray(staged[1]), np.asarray(k2[2]))
    dst = ref.scatter_pages(jnp.zeros_like(k2), jnp.asarray([1, 3, 4], jnp.int32), staged)
    np.testing.assert_array_equal(np.asarray(dst[3]), np.asarray(k2[2]))
    assert float(jnp.abs(dst[0]).sum()) == 0.0
