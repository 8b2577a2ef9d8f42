"""What ``engine.compile_cache_dir`` holds, and the process-wide count of what XLA
compiled versus loaded.

- ``steps/``: the engine's step executables, serialized by ``StepExecutables`` and keyed
  by everything that decides them (below), so a restarted worker loads each step shape
  without tracing, lowering or compiling it.
- everything else: JAX's persistent compilation cache, for the other jitted functions
  (and XLA's per-fusion autotuning results).

A restarted worker with the same code, model shape, config and JAX version loads its
executables (seconds) instead of compiling them (seconds each on a GPU, in parallel). The
directory is safe to delete at any time (``rm -r ~/.cache/jax-pd-toolkit/xla`` clears it).
What is loaded from it is run: keep it writable by this user only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pickle
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache as _cc
from jax.experimental.serialize_executable import deserialize_and_load, serialize

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


_thread = threading.local()  # .hits: JAX-cache hits on this thread (listeners run on the caller's)


def _on_event(event: str, **_) -> None:
    if event == _CACHE_HIT:
        with _lock:
            _counts.loaded += 1
        _thread.hits = getattr(_thread, "hits", 0) + 1


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


# ---- the step's executables, serialized by us --------------------------------------------
#
# JAX's cache is keyed by the lowered program, so a restarted worker still traces and
# lowers every step shape before it can look one up: ~0.5-1.7 s a shape on a GPU (the
# Pallas kernels are lowered in Python), most of a warm start. The store below keys each
# executable by what decides the program instead: the source of the packages that trace
# it, the JAX build, the device, XLA's flags, the model's shape and dtype, the attention
# backend, the shapes of the step's arguments and the step shape. A hit skips tracing, lowering and compiling altogether.

_PACKAGES = ("toolkit", "kernels")  # every Python file that can change the traced step


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the source of the packages that build the step (one process, one value)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for pkg in _PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def program_fingerprint(**parts: Any) -> str:
    """sha256 of everything besides the step shape that decides a step's executable:
    ``parts`` (the caller's: model args, dtype, backend, argument shapes), the code,
    the JAX build, the device and XLA's flags."""
    import jaxlib

    dev = jax.devices()[0]
    env = dict(code=code_fingerprint(), jax=jax.__version__, jaxlib=jaxlib.__version__,
               platform=dev.platform, device=dev.device_kind, platform_version=dev.client.platform_version,
               xla_flags=os.environ.get("XLA_FLAGS", ""), x64=jax.config.jax_enable_x64)
    blob = json.dumps({**parts, **env}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def compile_fresh(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, bool]:
    """Compile ``lowered`` without writing it to JAX's cache (the step store keeps it) and
    say whether XLA compiled it (False: an older entry of JAX's cache was loaded). Only a
    fresh executable may be stored: XLA:CPU re-serializes a loaded one without its
    functions (loading that fails with "Function ... not found")."""
    from jax._src import config as jax_config  # a thread-local override; no public form

    hits = getattr(_thread, "hits", 0)
    with jax_config.persistent_cache_min_compile_time_secs(float("inf")):
        exe = lowered.compile()
    return exe, getattr(_thread, "hits", 0) == hits


class StepExecutables:
    """Compiled step executables on disk, one file per step shape, under
    ``<compile_cache_dir>/steps/``. ``load`` returns None on a miss or on a file it cannot
    use (logged; the caller compiles); ``save`` writes atomically (a crash leaves no torn
    file). Files are pickles: like JAX's own cache, keep the directory writable by this
    user only. Deleting it is always safe."""

    def __init__(self, cache_dir: str | None, fingerprint: str):
        self.dir = os.path.join(cache_dir, "steps") if cache_dir else None
        self.fingerprint = fingerprint

    def _path(self, shape: Any) -> str:
        key = hashlib.sha256(f"{self.fingerprint}|{shape!r}".encode()).hexdigest()[:32]
        return os.path.join(self.dir, f"{key}.exe")

    def load(self, shape: Any):
        if self.dir is None:
            return None
        path = self._path(shape)
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            return deserialize_and_load(payload, in_tree, out_tree)
        except FileNotFoundError:
            return None
        except Exception as e:  # a file from another build or a torn disk: compile instead
            log.warning("cannot load the stored executable %s for %s (%s: %s); compiling it",
                        path, shape, type(e).__name__, e)
            return None

    def save(self, shape: Any, compiled) -> None:
        if self.dir is None:
            return
        try:
            os.makedirs(self.dir, exist_ok=True)
            blob = pickle.dumps(serialize(compiled))
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(shape))
        except Exception as e:  # a full or read-only disk costs the next start, not this one
            log.warning("cannot store the executable for %s (%s: %s)", shape, type(e).__name__, e)
