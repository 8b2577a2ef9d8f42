"""JAX's persistent compilation cache (``engine.compile_cache_dir``) and the process-wide
count of what XLA compiled versus loaded from that cache.

A restarted worker with the same model, config and JAX version finds its step
executables in the cache directory and loads them (seconds) instead of compiling them
(tens of seconds each on a GPU). The directory holds one file per executable, safe to
delete at any time (``rm -r ~/.cache/jax-pd-toolkit/xla`` clears it); with it, XLA's
per-fusion autotuning results are cached as well. JAX trusts what it loads from there:
keep it writable by this user only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache as _cc

log = logging.getLogger(__name__)

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # every compile request, hit or miss
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@dataclasses.dataclass
class CompileCounts:
    """Since the process started: XLA compile requests (``requests``), of which ``loaded``
    were found in the persistent cache; ``compiled`` = requests - loaded."""

    requests: int = 0
    loaded: int = 0
    seconds: float = 0.0  # spent in those requests (XLA compiling, or loading from the cache)
    trace_seconds: float = 0.0  # tracing Python to a jaxpr
    lower_seconds: float = 0.0  # jaxpr to StableHLO (Pallas kernels are lowered here)

    @property
    def compiled(self) -> int:
        return self.requests - self.loaded


_counts = CompileCounts()
_lock = threading.Lock()
_registered = False
_enabled_dir: str | None = None


def _on_event(event: str, **_) -> None:
    if event == _CACHE_HIT:
        with _lock:
            _counts.loaded += 1


def _on_duration(event: str, secs: float, **_) -> None:
    with _lock:
        if event == _BACKEND_COMPILE:
            _counts.requests += 1
            _counts.seconds += secs
        elif event == _TRACE:
            _counts.trace_seconds += secs
        elif event == _LOWER:
            _counts.lower_seconds += secs


def install_counters() -> None:
    """Count compilations from now on (idempotent)."""
    global _registered
    if not _registered:
        monitoring.register_event_listener(_on_event)
        monitoring.register_event_duration_secs_listener(_on_duration)
        _registered = True


def counts() -> CompileCounts:
    with _lock:
        return dataclasses.replace(_counts)


def enable(cache_dir: str) -> str | None:
    """Turn the persistent cache on at ``cache_dir`` ("" = leave it off); returns the
    resolved directory. Every executable is written, however fast it compiled (JAX's
    default skips those under a second, which on CPU is most of them). The first
    directory a process enables stays: JAX reads the setting once."""
    global _enabled_dir
    install_counters()
    path = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else None
    if _enabled_dir is not None:
        if _enabled_dir != path:
            log.warning("compile cache already at %s in this process; engine.compile_cache_dir=%s ignored",
                        _enabled_dir, path)
        return _enabled_dir
    if path is None:
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _cc.set_cache_dir(path)
    _cc.reset_cache()  # JAX decides once per process whether a cache is used: decide again
    _enabled_dir = path
    log.info("compile cache: %s", path)
    return path
