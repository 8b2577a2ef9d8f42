"""Bad configuration values fail with a clear message before anything is loaded or allocated."""

import pytest

from tests.conftest import TINY_MODEL, engine_cfg
from toolkit.config.validate import ConfigError
from toolkit.engine.engine import Engine


@pytest.fixture
def no_alloc(monkeypatch):
    """Make loading or allocating fail loudly, so a test passes only if validation came first."""
    import toolkit.cache.pool as pool
    import toolkit.models.loader as loader

    def boom(*a, **k):
        raise AssertionError("allocated or loaded before validation")

    monkeypatch.setattr(pool.KVPool, "__init__", boom)
    monkeypatch.setattr(loader, "load_checkpoint", boom)


@pytest.mark.parametrize("overrides,needle", [
    (dict(page_size=12), "engine.page_size=12 must be a power of two"),
    (dict(page_size=0), "engine.page_size=0"),
    (dict(num_pages=1), "engine.num_pages=1"),
    (dict(chunk_size=5000, num_pages=64, page_size=4), "engine.chunk_size=5000 is larger than the pool"),
    (dict(max_batch_size=0), "engine.max_batch_size"),
    (dict(attention_backend="flash9"),
     "engine.attention_backend='flash9' is not allowed; allowed values: auto, reference, pallas"),
    (dict(layer_loop="while"), "engine.layer_loop='while' is not allowed; allowed values: auto, scan, unroll"),
    (dict(compile_threads=-1), "engine.compile_threads=-1 must be >= 0"),
])
def test_bad_engine_values(no_alloc, overrides, needle):
    """Guards against impossible engine settings crashing later (or silently) instead of at start."""
    with pytest.raises(ConfigError) as ei:
        Engine.from_config(TINY_MODEL, engine_cfg(**overrides))
    assert needle in str(ei.value)


@pytest.mark.parametrize("model_kw,needle", [
    (dict(source="onnx"), "model.source='onnx' is not allowed; allowed values: gguf, hf, orbax, random"),
    (dict(source="gguf", path="/nonexistent/model.gguf"), "model.path='/nonexistent/model.gguf': no such file"),
    (dict(source="hf", path="/nonexistent"), "no such directory"),
    (dict(dtype="int3"), "model.dtype='int3'"),
    (dict(source="gguf", random_on_device=True), "model.random_on_device=true needs model.source=random"),
])
def test_bad_model_values(no_alloc, model_kw, needle):
    """Guards against a missing model file or unknown source surfacing as a stack trace mid-load."""
    import dataclasses

    with pytest.raises(ConfigError) as ei:
        Engine.from_config(dataclasses.replace(TINY_MODEL, **model_kw), engine_cfg())
    assert needle in str(ei.value)


def test_bad_role_cache_transfer(no_alloc):
    """Guards against roles/policies that do not exist yet being accepted and ignored."""
    from toolkit.config.schema import RunConfig
    from toolkit.config.validate import validate

    for path, attr in (("role", "name"), ("cache", "policy"), ("transfer", "backend")):
        cfg = RunConfig(model=TINY_MODEL, engine=engine_cfg())
        setattr(getattr(cfg, path), attr, "bogus")
        with pytest.raises(ConfigError, match=f"{path}.{attr}='bogus'"):
            validate(cfg)


def test_radix_is_the_default_and_every_role_takes_it(no_alloc):
    """Guards against the prefix cache being off by default, or refused on a role (or with
    disagg=true, both roles in one process: toolkit/run.py gives each engine the cache)."""
    from omegaconf import OmegaConf

    from toolkit.config.schema import RunConfig
    from toolkit.config.validate import validate

    assert RunConfig().cache.policy == "radix"
    cfg = OmegaConf.structured(RunConfig(model=TINY_MODEL, engine=engine_cfg()))
    cfg.transfer.backend = "inproc"
    OmegaConf.set_struct(cfg, False)
    cfg.disagg = True
    validate(cfg)
    for role in ("unified", "prefill", "decode"):
        c = RunConfig(model=TINY_MODEL, engine=engine_cfg())
        c.role.name, c.transfer.backend = role, "nixl" if role != "unified" else "none"
        validate(c)


def test_ucx_threads_only_with_nixl(no_alloc):
    """Guards against a NIXL thread setting being accepted (and silently ignored) with another
    transfer backend, or a negative thread count reaching NIXL."""
    from toolkit.config.schema import RunConfig
    from toolkit.config.validate import validate

    def cfg(backend, **t):
        c = RunConfig(model=TINY_MODEL, engine=engine_cfg())
        c.role.name, c.transfer.backend = "prefill", backend
        for k, v in t.items():
            setattr(c.transfer, k, v)
        return c

    validate(cfg("nixl", ucx_threads=8))
    with pytest.raises(ConfigError, match="transfer.ucx_threads=8 is a NIXL setting; transfer.backend=inproc"):
        validate(cfg("inproc", ucx_threads=8))
    with pytest.raises(ConfigError, match="transfer.ucx_threads=-1 must be >= 0"):
        validate(cfg("nixl", ucx_threads=-1))


def test_tier_options_refused_where_they_cannot_work(no_alloc, tmp_path):
    """Guards against KV-tier options that cannot work being accepted and failing on the
    first request (SGLang crashed there with offload and no storage backend,
    sgl-project/sglang#20677): decode_offload on a role that does not decode or without a
    host tier, tiers on the router, storage in a directory that cannot be written; each
    refused before anything is loaded, naming the options."""
    from toolkit.config.schema import RunConfig
    from toolkit.config.validate import validate

    def cfg(role, **cache):
        c = RunConfig(model=TINY_MODEL, engine=engine_cfg())
        c.role.name, c.transfer.backend = role, "nixl" if role in ("prefill", "decode") else "none"
        if role == "router":
            c.role.prefill_urls, c.role.decode_urls = ["http://a"], ["http://b"]
        for k, v in cache.items():
            setattr(c.cache, k, v)
        return c

    validate(cfg("decode", host_pages=8, decode_offload=True))  # host-only offload is fine
    validate(cfg("unified", host_pages=8, decode_offload=True))
    for c, msg in ((cfg("prefill", host_pages=8, decode_offload=True), "role.name=prefill"),
                   (cfg("decode", decode_offload=True), "needs a host tier"),
                   (cfg("decode", policy="none", host_pages=8), "cache.policy=radix"),
                   (cfg("router", host_pages=8), "role.name=router holds no KV"),
                   (cfg("unified", host_pages=8, storage="file", storage_path=str(tmp_path / "f" / "x")),
                    "not writable")):
        if "not writable" in msg:
            (tmp_path / "f").write_text("a file, not a directory")
        with pytest.raises(ConfigError, match=msg):
            validate(c)
    with pytest.raises(ConfigError, match="needs a host tier"):
        from toolkit.config.schema import CacheConfig

        Engine.from_config(TINY_MODEL, engine_cfg(), cache=CacheConfig(decode_offload=True))


def test_prefix_cache_with_a_hybrid_model_is_refused_before_loading(no_alloc):
    """Guards against a hybrid (Mamba2 layers: recurrent state the cache cannot snapshot)
    served from cached prefixes that carry no state: radix, the default, fails before any
    load or allocation, naming both options; cache=none and the router pass."""
    import dataclasses

    from toolkit.config.schema import CacheConfig, RunConfig
    from toolkit.config.validate import validate

    model = dataclasses.replace(TINY_MODEL, random=dict(TINY_MODEL.random, architecture="bamba",
                                                        attn_layer_indices=[1]))
    with pytest.raises(ConfigError, match=r"cache.policy=radix cannot serve model.random.architecture=bamba.*"
                                          r"cache=none"):
        Engine.from_config(model, engine_cfg())
    with pytest.raises(ConfigError, match="cannot serve"):
        validate(RunConfig(model=model, engine=engine_cfg()))
    validate(RunConfig(model=model, engine=engine_cfg(), cache=CacheConfig(policy="none")))
    with pytest.raises(ConfigError, match="engine.state_slots=-1"):
        Engine.from_config(model, engine_cfg(state_slots=-1), cache=CacheConfig(policy="none"))
