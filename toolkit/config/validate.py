"""Refuse impossible configurations before anything is loaded or allocated.

Every message names the option (as a Hydra override path) and what is allowed.

The allowed names are owned by the modules that implement the choices and read from
them here; none of those imports loads kernel code (kernels.attention imports its
Pallas / Mosaic GPU modules only when that backend is built; tests/config checks it).
"""

from __future__ import annotations

import os

from kernels.attention import CHOICES as ATTENTION_CHOICES
from toolkit.cache.policies import CACHE_POLICIES, POLICY_ROLES, STORAGE_BACKENDS
from toolkit.cache.pool import KV_ALLOC
from toolkit.disagg.choices import PD_ROLES, PD_TRANSFER_BACKENDS, TRANSFER_BACKENDS
from toolkit.engine.buckets import SHAPE_BUCKETS
from toolkit.models.loader import SOURCES as MODEL_SOURCES
from toolkit.models.spec import LAYER_LOOPS, STATE_ARCHITECTURES

# Kept here: their implementations sit in modules that import JAX or FastAPI at the top
# (toolkit.engine.engine.resolve_dtype; serve/__main__.py and serve/router.py).
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: float32 on CPU, bfloat16 on GPU
ROLES = ("unified", *PD_ROLES, "router")  # what a `python -m serve` process runs
ROUTER_POLICIES = ("round_robin", "least_loaded", "cache_aware")
_PD_BACKENDS = ", ".join(PD_TRANSFER_BACKENDS)


class ConfigError(ValueError):
    pass


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(path: str, value, allowed) -> None:
    _need(value in allowed, f"{path}={value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")


def validate_model(m) -> None:
    _one_of("model.source", m.source, MODEL_SOURCES)
    _one_of("model.dtype", m.dtype, DTYPES)
    _need(not m.random_on_device or m.source == "random",
          f"model.random_on_device=true needs model.source=random (got model.source={m.source})")
    if m.source == "gguf" and not m.path:
        _need(bool(m.gguf_package and m.gguf_file),
              "model.source=gguf needs model.path (a .gguf file) or model.gguf_package and model.gguf_file")
    if m.source in ("hf", "orbax"):
        _need(bool(m.path), f"model.source={m.source} needs model.path (a directory)")
        _need(os.path.isdir(m.path), f"model.path={m.path!r}: no such directory")
    if m.source == "gguf" and m.path:
        _need(os.path.isfile(m.path), f"model.path={m.path!r}: no such file")


def state_architecture(model) -> str | None:
    """The architecture of a model with recurrent state (Mamba2 layers), else None. ``model``:
    loaded ``ModelArgs``, or a ``ModelConfig`` (then only an hf directory's config.json, or
    model.random's architecture, is read: no weights)."""
    if hasattr(model, "has_state"):
        return model.architecture if model.has_state else None
    arch = None
    if model.source == "hf" and model.path and os.path.isfile(os.path.join(model.path, "config.json")):
        import json

        try:
            with open(os.path.join(model.path, "config.json")) as f:
                arch = json.load(f).get("model_type")
        except (OSError, ValueError):
            return None  # the loader reports a bad config.json
    elif model.source == "random":
        arch = (model.random or {}).get("architecture")
    return arch if arch in STATE_ARCHITECTURES else None


def validate_model_cache(model, c) -> None:
    """A prefix cache needs KV that a cached prefix fully describes: a model with recurrent
    state would need its state snapshotted at page boundaries, which the engine does not do."""
    arch = state_architecture(model)
    if arch is None or c.policy == "none":
        return
    if getattr(model, "source", None) == "hf":
        what = f"model.path={model.path} (a {arch} model)"
    elif getattr(model, "source", None) == "random":
        what = f"model.random.architecture={arch}"
    else:
        what = f"a {arch} model"
    _need(False, f"cache.policy={c.policy} cannot serve {what}: its Mamba2 layers keep recurrent state, "
          "which is not snapshotted at page boundaries, so a cached prefix has no state to start from; "
          "use cache=none (cache.policy=none) with this model")


def validate_engine(e) -> None:
    ps = e.page_size
    _need(isinstance(ps, int) and ps >= 1 and ps & (ps - 1) == 0,
          f"engine.page_size={ps} must be a power of two (1, 2, 4, ..., e.g. 16)")
    _need(e.num_pages >= 2 or e.memory_fraction > 0,
          f"engine.num_pages={e.num_pages} must be >= 2 (page 0 is reserved), or set engine.memory_fraction")
    _need(0 <= e.memory_fraction <= 0.95,
          f"engine.memory_fraction={e.memory_fraction} must be in [0, 0.95] (0 = use engine.num_pages)")
    _need(e.max_batch_size >= 1, f"engine.max_batch_size={e.max_batch_size} must be >= 1")
    _need(e.max_prefill_seqs >= 1, f"engine.max_prefill_seqs={e.max_prefill_seqs} must be >= 1")
    mb = e.min_bucket
    _need(isinstance(mb, int) and mb >= 1 and mb & (mb - 1) == 0,
          f"engine.min_bucket={mb} must be a power of two (shapes are padded to powers of two from it)")
    _need(isinstance(e.compile_threads, int) and e.compile_threads >= 0,
          f"engine.compile_threads={e.compile_threads} must be >= 0 (0 = min(8, CPU cores))")
    _need(e.chunk_size >= 1, f"engine.chunk_size={e.chunk_size} must be >= 1")
    _need(e.max_model_len >= 0, f"engine.max_model_len={e.max_model_len} must be >= 0 (0 = the model's)")
    if e.memory_fraction == 0:
        capacity = (e.num_pages - 1) * ps
        _need(e.chunk_size <= capacity,
              f"engine.chunk_size={e.chunk_size} is larger than the pool: engine.num_pages={e.num_pages} "
              f"x engine.page_size={ps} holds {capacity} tokens (page 0 is reserved)")
    _one_of("engine.attention_backend", e.attention_backend, ATTENTION_CHOICES)
    _one_of("engine.kv_alloc", e.kv_alloc, KV_ALLOC)
    _one_of("engine.layer_loop", e.layer_loop, LAYER_LOOPS)
    _one_of("engine.shape_buckets", e.shape_buckets, SHAPE_BUCKETS)
    _need(e.state_slots >= 0, f"engine.state_slots={e.state_slots} must be >= 0 (0 = what the role needs)")


def validate(cfg) -> None:
    """Whole-run check: model, engine, role, cache, transfer."""
    validate_model(cfg.model)
    validate_engine(cfg.engine)
    _one_of("role.name", cfg.role.name, ROLES)
    validate_cache(cfg.cache)
    if cfg.role.name != "router":
        validate_model_cache(cfg.model, cfg.cache)
    _need(not cfg.cache.decode_offload or cfg.role.name in ("unified", "decode"),
          f"cache.decode_offload=true runs where requests decode (role.name=decode or unified), "
          f"not on role.name={cfg.role.name}")
    _need(cfg.role.name != "router" or not _has_tiers(cfg.cache),
          "role.name=router holds no KV: drop cache.host_pages / cache.host_gb / cache.storage")
    _need(cfg.role.name in POLICY_ROLES[cfg.cache.policy],
          f"cache.policy={cfg.cache.policy} runs on role={' or '.join(POLICY_ROLES[cfg.cache.policy])} "
          f"(not yet on role={cfg.role.name}); use cache=none there")
    _one_of("transfer.backend", cfg.transfer.backend, TRANSFER_BACKENDS)
    validate_pd(cfg.role, cfg.transfer, getattr(cfg, "disagg", False))


def validate_pd(role, t, disagg: bool = False) -> None:
    """P/D roles need a transfer backend, and the unified role must not ask for one."""
    if role.name == "router":
        _need(bool(role.prefill_urls) and bool(role.decode_urls),
              "role=router needs role.prefill_urls and role.decode_urls (lists of worker URLs)")
        _one_of("role.policy", role.policy, ROUTER_POLICIES)
        return
    if disagg:
        _need(role.name == "unified", f"disagg=true runs both roles in one process; drop role.name={role.name}")
        _need(t.backend != "none", f"disagg=true needs a transfer backend: set transfer to one of {_PD_BACKENDS}")
    elif role.name in PD_ROLES:
        _need(t.backend != "none", f"role.name={role.name} needs a transfer backend: "
              f"set transfer.backend to one of {_PD_BACKENDS}")
    elif t.backend != "none":
        _need(False, f"transfer.backend={t.backend} is only used by role.name={' or '.join(PD_ROLES)} "
              f"(got role.name={role.name}); use transfer.backend=none")
    for f in ("bootstrap_timeout_s", "wait_timeout_s"):
        _need(getattr(t, f) > 0, f"transfer.{f}={getattr(t, f)} must be > 0")
    _need(t.quarantine_s >= 0, f"transfer.quarantine_s={t.quarantine_s} must be >= 0")
    _need(0 <= t.fault_rate <= 1, f"transfer.fault_rate={t.fault_rate} must be in [0, 1]")
    _need(t.max_rooms >= 1, f"transfer.max_rooms={t.max_rooms} must be >= 1")
    _need(t.ucx_threads >= 0 and t.ucx_split_batch >= 1,
          f"transfer.ucx_threads={t.ucx_threads} must be >= 0 and transfer.ucx_split_batch="
          f"{t.ucx_split_batch} >= 1")
    _need(t.ucx_threads == 0 or t.backend == "nixl",
          f"transfer.ucx_threads={t.ucx_threads} is a NIXL setting; transfer.backend={t.backend}")


def _has_tiers(c) -> bool:
    return c.host_pages > 0 or c.host_gb > 0 or c.storage != "none"


def validate_cache(c) -> None:
    """The prefix-cache policy and its tiers (the engine checks it again when built without
    ``validate``). Runs before anything is allocated: a storage directory is created and
    probed for writing and free space, nothing more."""
    _one_of("cache.policy", c.policy, CACHE_POLICIES)
    _one_of("cache.storage", c.storage, STORAGE_BACKENDS)
    _need(c.host_pages >= 0 and c.host_gb >= 0,
          f"cache.host_pages={c.host_pages} and cache.host_gb={c.host_gb} must be >= 0")
    _need(not (c.host_pages > 0 and c.host_gb > 0),
          f"set one of cache.host_pages={c.host_pages} and cache.host_gb={c.host_gb}, not both")
    host = c.host_pages > 0 or c.host_gb > 0
    if _has_tiers(c) or c.decode_offload:
        what = "cache.decode_offload=true" if c.decode_offload else (
            "cache.storage=file" if c.storage != "none" else "a host tier (cache.host_pages / cache.host_gb)")
        _need(c.policy == "radix", f"{what} needs cache.policy=radix (got cache.policy={c.policy}): the tiers "
              "hold pages of the prefix cache's tree")
    _need(not c.decode_offload or host,
          "cache.decode_offload=true needs a host tier: set cache.host_pages or cache.host_gb "
          "(cache.storage is optional below it)")
    if c.storage == "file":
        _need(host, "cache.storage=file needs a host tier (cache.host_pages or cache.host_gb): pages move "
              "between storage and the device through host memory")
        _need(bool(c.storage_path), "cache.storage=file needs cache.storage_path (a directory)")
        _need(c.storage_gb > 0, f"cache.storage_gb={c.storage_gb} must be > 0")
        _check_storage_dir(c.storage_path, c.storage_gb)


def _check_storage_dir(path: str, gb: float) -> None:
    """Writable, and room for the slots file (counting a file an earlier run left there)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".probe")
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cache.storage_path={path!r} is not writable: {e}") from None
    st = os.statvfs(path)
    have = st.f_bavail * st.f_frsize
    data = os.path.join(path, "pages.bin")
    have += os.path.getsize(data) if os.path.exists(data) else 0
    need = int(gb * (1 << 30))
    _need(need <= have, f"cache.storage_gb={gb} needs {need / (1 << 30):.2f} GiB at cache.storage_path={path!r}; "
          f"the disk has {have / (1 << 30):.2f} GiB free")
