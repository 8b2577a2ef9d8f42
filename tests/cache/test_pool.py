"""Who allocates the KV pool: XLA on CPU; cudaMalloc (imported by DLPack) only on a GPU."""

import jax
import pytest

from tests.conftest import TINY_MODEL, engine_cfg
from toolkit.cache.pool import KVPool, PoolLayout, resolve_alloc
from toolkit.config.validate import ConfigError
from toolkit.engine.engine import Engine


def test_auto_is_xla_on_cpu_and_cuda_malloc_is_refused():
    """Guards against the CPU path trying to allocate through torch/CUDA, and against a
    cuda_malloc request on CPU silently falling back instead of saying why."""
    dev = jax.devices()[0]
    assert resolve_alloc("auto", dev) == "xla"
    with pytest.raises(ValueError, match="engine.kv_alloc=cuda_malloc needs a GPU"):
        resolve_alloc("cuda_malloc", dev)
    with pytest.raises(ValueError, match="engine.kv_alloc='vmm'"):
        resolve_alloc("vmm", dev)
    pool = KVPool(PoolLayout(2, 4, 4, 2, 8, "float32"), alloc="auto")
    assert pool.alloc == "xla" and pool.k.shape == (4, 2, 4, 2, 8)  # page-major [P, L, S, KV, Dh]


def test_bad_kv_alloc_is_a_config_error_before_allocation():
    """Guards against an unknown engine.kv_alloc reaching the allocator."""
    with pytest.raises(ConfigError, match="engine.kv_alloc='vmm' is not allowed; allowed values: auto, xla, cuda_malloc"):
        Engine.from_config(TINY_MODEL, engine_cfg(kv_alloc="vmm"))
