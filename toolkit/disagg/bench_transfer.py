"""KV page transfer bandwidth through ``NixlBackend`` between two OS processes.

    python -m toolkit.disagg.bench_transfer --mib 512 --src-device 0 --dst-device 0   # one GPU
    python -m toolkit.disagg.bench_transfer --mib 512 --src-device 0 --dst-device 1   # two GPUs
    python -m toolkit.disagg.bench_transfer --mib 32                  # CPU-only machine: DRAM pools
    python -m toolkit.disagg.bench_transfer --ucx-info [--with-jax]   # what UCX loads (the wheel has no ucx_info)
    python -m toolkit.disagg.bench_transfer --ld-path                 # dirs of libcudart/libcuda/libnvidia-ml

Two spawned processes (``dst``: the target, like decode; ``src``: the initiator, like prefill)
each own a KV pool ``[L, P, S, KV, Dh]`` x (K, V) on the chosen device (``--alloc jax``: JAX
arrays, as a ``KVPool``; ``torch``/``cupy``: raw ``cudaMalloc`` memory, for comparison, see
below). ``src`` connects to ``dst`` and times ``write()`` -> status DONE for

    random   ``--mib`` worth of pages, a shuffled set of even pages into a shuffled set of odd
             pages: no two consecutive descriptors are address-adjacent, so nothing merges
             (2*L*n descriptors of ``page_bytes``)
    contig   pages 0..n-1 into pages n..2n-1: NIXL can merge each (buffer, layer) run into one
             descriptor (2*L descriptors of n*page_bytes)

each with the aux record and a notification (the real two-stage write when the pools are VRAM),
median over ``--repeats`` after ``--warmup``. The bytes are verified afterwards (a CRC of every
transferred (buffer, layer, page) row on both sides, plus two sampled pages compared byte for
byte through host copies), and the same number of bytes is copied device-to-device in ``src``
as the ceiling (same device: a jitted slice copy and a jitted page gather; two devices:
``jax.device_put`` to the other GPU; CPU: numpy copies). The table comes last.

UCX reads its ``UCX_*`` settings from the environment: set them around this script (see
scripts/gpu_pd_transfer.sh); ``--env-variant`` is only the label printed with the results.
With ``UCX_LOG_LEVEL=info UCX_MODULE_LOG_LEVEL=info`` UCX names every module it fails to
``dlopen`` and why; with ``UCX_PROTO_INFO=y`` it prints the protocol it picked per operation
("remote memory write by ucp_put* from cuda memory to cuda": ``zero-copy cuda_ipc/cuda`` is the
fast path, ``software emulation ... tcp`` the slow one).

Why ``--alloc torch|cupy``: since JAX/XLA 0.11 every device buffer comes from XLA's VMM
allocator (``cuMemCreate``, shareable as a POSIX fd), which is not "legacy CUDA IPC capable";
the UCX bundled in the nixl 1.5.1 wheels exports VMM memory to ``cuda_ipc`` only as a FABRIC
handle, so JAX pools get no ``cuda_ipc`` lane. ``cudaMalloc`` memory (torch's and cupy's default
allocators) does; the two runs side by side show what the pool allocation costs. Each child
prints the CUDA attributes of its pool pointer (legacy IPC capable, allowed handle types).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import json
import os
import site
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from typing import Any, Optional

import numpy as np

from toolkit.disagg.transfer import AuxBuffer, PoolSpec, XferStatus

# ---- UCX / CUDA library diagnostics (no JAX, no NIXL import needed) ------------------------------


def nixl_libs_dir() -> Optional[str]:
    """The ``nixl_cu1X.libs`` directory of the installed NIXL wheel (bundled UCX and its modules)."""
    for name in ("nixl_cu13", "nixl_cu12", "nixl"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        pkg = os.path.dirname(os.path.abspath(mod.__file__))
        cands = [pkg + ".libs"] + sorted(glob.glob(os.path.join(os.path.dirname(pkg), "nixl_cu*.libs")))
        for c in cands:
            if glob.glob(os.path.join(c, "libucp*.so*")):
                return c
    return None


def _site_dirs() -> list[str]:
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) or p.startswith("/tmp/site")]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def find_cuda_libs() -> dict[str, list[str]]:
    """Where libcudart.so.1x (pip: nvidia/cu13/lib, nvidia/cuda_runtime/lib), libcuda.so.1 and
    libnvidia-ml.so.1 (driver: ldconfig, /usr/local/nvidia/lib64, ...) are on this machine."""
    found: dict[str, list[str]] = {"libcudart": [], "libcuda.so.1": [], "libnvidia-ml.so.1": []}
    for d in _site_dirs():
        found["libcudart"] += glob.glob(os.path.join(d, "nvidia", "*", "lib", "libcudart.so.1*"))
        found["libcudart"] += glob.glob(os.path.join(d, "nvidia", "*", "*", "lib", "libcudart.so.1*"))
    driver_dirs = ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu",
                   "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/local/cuda/compat", "/usr/local/cuda/lib64",
                   "/usr/lib/wsl/lib"] + os.environ.get("LD_LIBRARY_PATH", "").split(":")
    try:
        ldc = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        ldc = ""
    for lib in ("libcuda.so.1", "libnvidia-ml.so.1"):
        for line in ldc.splitlines():
            if line.strip().startswith(lib + " ") and "=>" in line:
                found[lib].append(line.split("=>")[-1].strip())
        for d in driver_dirs:
            p = os.path.join(d, lib)
            if d and os.path.exists(p):
                found[lib].append(p)
    return {k: list(dict.fromkeys(os.path.realpath(p) if k == "libcudart" else p for p in v))
            for k, v in found.items()}


def suggested_ld_path(cuda_major: str = "13") -> str:
    """Colon-joined dirs to prepend to LD_LIBRARY_PATH so UCX's CUDA modules resolve their
    NEEDED libs: libuct_cuda needs libcuda.so.1 + libnvidia-ml.so.1, libucm_cuda also
    libcudart.so.<major>. The loader's default dirs are left out (searched anyway). Must be set
    before the process starts: ld.so reads LD_LIBRARY_PATH once."""
    libs = find_cuda_libs()
    dirs = [os.path.dirname(p) for p in libs["libcudart"] if f"libcudart.so.{cuda_major}" in os.path.basename(p)]
    dirs += [os.path.dirname(p) for p in libs["libcuda.so.1"] + libs["libnvidia-ml.so.1"]]
    default = {"/lib", "/usr/lib", "/lib64", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"}
    return ":".join(dict.fromkeys(d for d in dirs if d and d.rstrip("/") not in default))


def probe_ucx_modules(libs_dir: str) -> list[str]:
    """dlopen every bundled UCX module the way UCX does (RTLD_LAZY|RTLD_LOCAL), each in a fresh
    process, and report dlerror(): the first NEEDED library the loader could not find."""
    code = ("import ctypes,sys\n"
            "dl=ctypes.CDLL('libdl.so.2')\n"
            "dl.dlopen.restype=ctypes.c_void_p; dl.dlopen.argtypes=[ctypes.c_char_p, ctypes.c_int]\n"
            "dl.dlerror.restype=ctypes.c_char_p\n"
            "h=dl.dlopen(sys.argv[1].encode(), 1)\n"
            "print('ok' if h else 'FAILED: '+(dl.dlerror() or b'?').decode())\n")
    out = []
    for path in sorted(glob.glob(os.path.join(libs_dir, "ucx", "lib*.so*"))):
        try:
            r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60)
            msg = (r.stdout.strip() or r.stderr.strip().splitlines()[-1:] or ["?"])
            msg = msg if isinstance(msg, str) else msg[0]
        except (OSError, subprocess.SubprocessError) as e:
            msg = f"probe failed: {e!r}"
        out.append(f"{os.path.basename(path):32s} {msg}")
    return out


def ucx_context_lines(libs_dir: Optional[str] = None) -> list[str]:
    """``ucp_context_print_info`` of a fresh UCP context (RMA+AM, like NIXL's): the components,
    memory domains and transport resources UCX found in *this* process. Uses the UCX bundled
    with NIXL (same library NIXL already loaded, so the same module state)."""
    libs_dir = libs_dir or nixl_libs_dir()
    if not libs_dir:
        return ["(no NIXL wheel UCX found)"]
    ucp = ctypes.CDLL(glob.glob(os.path.join(libs_dir, "libucp*.so*"))[0])
    maj, mnr, rel = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
    ucp.ucp_get_version(ctypes.byref(maj), ctypes.byref(mnr), ctypes.byref(rel))
    params = (ctypes.c_uint64 * 64)()  # ucp_params_t is smaller; only field_mask and features are read
    params[0] = 1  # UCP_PARAM_FIELD_FEATURES
    params[1] = (1 << 1) | (1 << 6)  # UCP_FEATURE_RMA | UCP_FEATURE_AM
    ctx = ctypes.c_void_p()
    st = ucp.ucp_init_version(maj.value, mnr.value, ctypes.byref(params), None, ctypes.byref(ctx))
    lines = [f"UCX {maj.value}.{mnr.value}.{rel.value} from {libs_dir}"]
    if st != 0:
        return lines + [f"ucp_init failed: status {st}"]
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile("r", suffix=".ucx") as tmp:
        f = libc.fopen(tmp.name.encode(), b"w")
        ucp.ucp_context_print_info(ctx, ctypes.c_void_p(f))
        libc.fclose(ctypes.c_void_p(f))
        text = open(tmp.name).read()
    ucp.ucp_cleanup(ctx)
    return lines + [ln.strip("# ").rstrip() for ln in text.splitlines()
                    if any(w in ln for w in ("component", " md ", "resource"))]


_HANDLE_TYPES = {1: "POSIX_FD", 2: "WIN32", 4: "WIN32_KMT", 8: "FABRIC"}


def cuda_pointer_info(ptr: int, ordinal: int) -> str:
    """What UCX's cuda_ipc looks at to export a pointer (and what the driver/device support)."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"libcuda.so.1 not loadable: {e}"
    cu.cuInit(0)
    drv = ctypes.c_int()
    cu.cuDriverGetVersion(ctypes.byref(drv))
    dev = ctypes.c_int()
    cu.cuDeviceGet(ctypes.byref(dev), ordinal)
    ctx = ctypes.c_void_p()
    cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
    cu.cuCtxPushCurrent_v2(ctx)
    try:
        def pattr(a: int) -> Any:
            v = ctypes.c_uint64(0)
            r = cu.cuPointerGetAttribute(ctypes.byref(v), a, ctypes.c_uint64(ptr))
            return v.value if r == 0 else f"err{r}"

        def dattr(a: int) -> Any:
            v = ctypes.c_int(0)
            r = cu.cuDeviceGetAttribute(ctypes.byref(v), a, dev)
            return v.value if r == 0 else f"err{r}"

        legacy, handles = pattr(10), pattr(14)  # IS_LEGACY_CUDA_IPC_CAPABLE, ALLOWED_HANDLE_TYPES
        start, size, ordl = pattr(11), pattr(12), pattr(9)
        names = ("|".join(n for b, n in _HANDLE_TYPES.items() if handles & b) or "none") \
            if isinstance(handles, int) else handles
        rng = f"[{start:#x}, +{size / 2**20:.0f} MiB]" if isinstance(size, int) and isinstance(start, int) \
            else f"{start} {size}"
        return (f"ptr {ptr:#x}: legacy_cuda_ipc_capable={legacy} allowed_handle_types={names} "
                f"alloc_range={rng} dev={ordl} | device {ordinal}: vmm={dattr(102)} "
                f"posix_fd_handles={dattr(103)} fabric_handles={dattr(128)} | driver {drv.value}")
    finally:
        cu.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        cu.cuDevicePrimaryCtxRelease_v2(dev)


# ---- pools -------------------------------------------------------------------------------------


def _random_bits(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Random finite values of ``dtype``: random bits with the exponent's top bit cleared."""
    n = int(np.prod(shape)) * dtype.itemsize
    raw = rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]
    if dtype.itemsize in (2, 4, 8):
        u = raw.view(f"<u{dtype.itemsize}")
        u &= ~np.array(1 << (8 * dtype.itemsize - 2), u.dtype)
    return raw.view(dtype).reshape(shape)


class _Pool:
    """K and V buffers ``[L, P, S, KV, Dh]`` on one device, plus what the benchmark needs."""

    gpu: bool
    device_id: int

    def __init__(self, cfg: dict, fill_seed: Optional[int]):
        self.cfg = cfg
        self.shape = tuple(cfg["shape"])
        self.dtype = np.dtype(_np_dtype(cfg["dtype"]))
        self.page_bytes = int(np.prod(self.shape[2:])) * self.dtype.itemsize
        self.host = None
        if fill_seed is not None:
            rng = np.random.default_rng(fill_seed)
            self.host = (_random_bits(rng, self.shape, self.dtype), _random_bits(rng, self.shape, self.dtype))

    def pointers(self) -> tuple[int, int]:
        raise NotImplementedError

    def gather_host(self, pages: np.ndarray) -> np.ndarray:
        """[2, L, n, ...] host copy of the pages (in this order)."""
        raise NotImplementedError

    def ceilings(self, n: int, gather: np.ndarray, dst_index: int, repeats: int) -> list[tuple[str, list[float]]]:
        raise NotImplementedError

    def spec(self) -> PoolSpec:
        L, P, S, KV, Dh = self.shape
        return PoolSpec(L, P, S, KV, Dh, self.cfg["dtype"], self.page_bytes, "VRAM" if self.gpu else "DRAM",
                        self.device_id if self.gpu else 0, tuple(int(a) for a in self.pointers()))

    def rows(self, pages: np.ndarray) -> np.ndarray:
        """uint8 [2, L, n, page_bytes]: the bytes of each (buffer, layer, page) row."""
        h = np.ascontiguousarray(self.gather_host(np.asarray(pages, np.int64)))
        L, n = self.shape[0], len(pages)
        return h.view(np.uint8).reshape(2, L, n, self.page_bytes)

    def describe(self) -> list[str]:
        k, v = self.pointers()
        mib = 2 * np.prod(self.shape) * self.dtype.itemsize / 2**20
        lines = [f"pool {self.cfg['alloc']} {'VRAM' if self.gpu else 'DRAM'} device {self.device_id} "
                 f"shape {self.shape} x2 {self.cfg['dtype']} = {mib:.0f} MiB, K at {k:#x}, V at {v:#x}"]
        if self.gpu:
            lines.append("cuda " + cuda_pointer_info(k, self.device_id))
        return lines


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _timed(fn, sync, repeats: int) -> list[float]:
    sync(fn())  # warm-up (compiles)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = fn()
        sync(r)
        out.append(time.perf_counter() - t0)
        del r
    return out


def _numpy_ceilings(hk: np.ndarray, hv: np.ndarray, n: int, gather: np.ndarray, repeats: int):
    """DRAM pools: numpy copies of the same bytes (contiguous) and of the same pages (gather)."""
    src = (np.ascontiguousarray(hk[:, :n]), np.ascontiguousarray(hv[:, :n]))
    dst = (np.empty_like(src[0]), np.empty_like(src[1]))
    outk, outv = np.empty_like(src[0]), np.empty_like(src[1])

    def copy():
        np.copyto(dst[0], src[0])
        np.copyto(dst[1], src[1])

    def take():
        np.take(hk, gather, axis=1, out=outk)
        np.take(hv, gather, axis=1, out=outv)

    return [("numpy copy (same bytes)", _timed(copy, lambda _: None, repeats)),
            ("numpy take (same pages)", _timed(take, lambda _: None, repeats))]


class _JaxPool(_Pool):
    def __init__(self, cfg: dict, fill_seed: Optional[int]):
        super().__init__(cfg, fill_seed)
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.dev = jax.devices()[cfg["device"]]
        self.gpu = self.dev.platform != "cpu"
        self.device_id = self.dev.id
        if self.host is None:
            with jax.default_device(self.dev):  # separate buffers: K and V must not alias
                self.k = jnp.zeros(self.shape, self.dtype)
                self.v = jnp.zeros(self.shape, self.dtype)
        else:
            self.k = jax.device_put(self.host[0], self.dev)
            self.v = jax.device_put(self.host[1], self.dev)
        jax.block_until_ready((self.k, self.v))
        self._gather = jax.jit(lambda k, v, i: jnp.stack([k[:, i], v[:, i]]))

    def pointers(self):
        return self.k.unsafe_buffer_pointer(), self.v.unsafe_buffer_pointer()

    def gather_host(self, pages):
        # A jitted gather reads the device memory as it is now (never a cached host copy).
        idx = self.jax.device_put(pages.astype(np.int32), self.dev)
        return np.asarray(self.jax.device_get(self._gather(self.k, self.v, idx)))

    def ceilings(self, n, gather, dst_index, repeats):
        jax = self.jax
        sync = jax.block_until_ready
        if not self.gpu:
            return _numpy_ceilings(np.asarray(self.k), np.asarray(self.v), n, gather, repeats)
        sl = jax.jit(lambda k, v: (k[:, :n], v[:, :n]))
        if dst_index == self.cfg["device"]:
            idx = jax.device_put(gather.astype(np.int32), self.dev)
            ga = jax.jit(lambda k, v, i: (k[:, i], v[:, i]))
            return [("jit slice copy (same device)", _timed(lambda: sl(self.k, self.v), sync, repeats)),
                    ("jit page gather (same device)", _timed(lambda: ga(self.k, self.v, idx), sync, repeats))]
        a = sync(sl(self.k, self.v))
        other = jax.devices()[dst_index]
        return [(f"jax.device_put {self.device_id}->{other.id}",
                 _timed(lambda: jax.device_put(a, other), sync, repeats))]


class _TorchPool(_Pool):
    def __init__(self, cfg: dict, fill_seed: Optional[int]):
        super().__init__(cfg, fill_seed)
        import torch

        self.torch = torch
        self.gpu = torch.cuda.is_available() and cfg.get("platform") != "cpu"
        self.device_id = cfg["device"] if self.gpu else 0
        self.dev = torch.device(f"cuda:{self.device_id}" if self.gpu else "cpu")
        it = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[self.dtype.itemsize]
        if self.host is None:
            self.k = torch.zeros(self.shape, dtype=it, device=self.dev)
            self.v = torch.zeros(self.shape, dtype=it, device=self.dev)
        else:
            npi = f"<i{self.dtype.itemsize}"
            self.k = torch.from_numpy(self.host[0].view(npi)).to(self.dev, copy=True)
            self.v = torch.from_numpy(self.host[1].view(npi)).to(self.dev, copy=True)
        self._sync(None)

    def _sync(self, _):
        if self.gpu:
            self.torch.cuda.synchronize(self.dev)

    def pointers(self):
        return self.k.data_ptr(), self.v.data_ptr()

    def gather_host(self, pages):
        i = self.torch.as_tensor(pages, dtype=self.torch.long, device=self.dev)
        return self.torch.stack([self.k[:, i], self.v[:, i]]).cpu().numpy()

    def ceilings(self, n, gather, dst_index, repeats):
        torch = self.torch
        if not self.gpu:
            return _numpy_ceilings(self.k.numpy(), self.v.numpy(), n, gather, repeats)
        if dst_index == self.cfg["device"]:
            i = torch.as_tensor(gather, dtype=torch.long, device=self.dev)
            return [("torch slice clone (same device)",
                     _timed(lambda: (self.k[:, :n].clone(), self.v[:, :n].clone()), self._sync, repeats)),
                    ("torch page gather (same device)",
                     _timed(lambda: (self.k[:, i], self.v[:, i]), self._sync, repeats))]
        a = (self.k[:, :n].contiguous(), self.v[:, :n].contiguous())
        other = torch.device(f"cuda:{dst_index}")

        def sync(_):
            torch.cuda.synchronize(self.dev)
            torch.cuda.synchronize(other)

        return [(f"torch .to cuda:{self.device_id}->cuda:{dst_index}",
                 _timed(lambda: (a[0].to(other), a[1].to(other)), sync, repeats))]


class _CupyPool(_Pool):
    def __init__(self, cfg: dict, fill_seed: Optional[int]):
        super().__init__(cfg, fill_seed)
        import cupy as cp

        self.cp = cp
        self.gpu = True
        self.device_id = cfg["device"]
        npi = np.dtype(f"<i{self.dtype.itemsize}")
        with cp.cuda.Device(self.device_id):
            if self.host is None:
                self.k, self.v = cp.zeros(self.shape, npi), cp.zeros(self.shape, npi)
            else:
                self.k, self.v = cp.asarray(self.host[0].view(npi)), cp.asarray(self.host[1].view(npi))
            cp.cuda.Device(self.device_id).synchronize()

    def _sync(self, _):
        self.cp.cuda.Device(self.device_id).synchronize()

    def pointers(self):
        return self.k.data.ptr, self.v.data.ptr

    def gather_host(self, pages):
        cp = self.cp
        with cp.cuda.Device(self.device_id):
            i = cp.asarray(pages)
            return cp.asnumpy(cp.stack([self.k[:, i], self.v[:, i]]))

    def ceilings(self, n, gather, dst_index, repeats):
        cp = self.cp
        with cp.cuda.Device(self.device_id):
            if dst_index == self.device_id:
                i = cp.asarray(gather)
                return [("cupy slice copy (same device)",
                         _timed(lambda: (cp.ascontiguousarray(self.k[:, :n]), cp.ascontiguousarray(self.v[:, :n])),
                                self._sync, repeats)),
                        ("cupy page gather (same device)",
                         _timed(lambda: (self.k[:, i], self.v[:, i]), self._sync, repeats))]
            a = (cp.ascontiguousarray(self.k[:, :n]), cp.ascontiguousarray(self.v[:, :n]))
        with cp.cuda.Device(dst_index):
            out = (cp.empty(a[0].shape, a[0].dtype), cp.empty(a[1].shape, a[1].dtype))

        def put():
            for o, s in zip(out, a, strict=True):
                o.data.copy_from_device(s.data, s.nbytes)
            return out

        def sync(_):
            cp.cuda.Device(self.device_id).synchronize()
            cp.cuda.Device(dst_index).synchronize()

        return [(f"cupy peer copy {self.device_id}->{dst_index}", _timed(put, sync, repeats))]


def _make_pool(cfg: dict, fill_seed: Optional[int]) -> _Pool:
    return {"jax": _JaxPool, "torch": _TorchPool, "cupy": _CupyPool}[cfg["alloc"]](cfg, fill_seed)


def _digest(pool: _Pool, pages: np.ndarray, sample: list[int]) -> tuple[np.ndarray, bytes]:
    rows = pool.rows(pages)
    flat = rows.reshape(-1, rows.shape[-1])
    crc = np.fromiter((zlib.crc32(r) for r in flat), np.uint32, count=flat.shape[0]).reshape(rows.shape[:3])
    return crc, rows[:, :, sample].tobytes()


# ---- the two processes -------------------------------------------------------------------------


def _child(role: str, conn, cfg: dict) -> None:
    backend = None
    try:
        from toolkit.disagg.nixl_backend import NixlBackend

        pool = _make_pool(cfg, cfg["seed"] if role == "src" else None)
        backend = NixlBackend(f"bench-{role}-{os.getpid()}", pool.spec(), AuxBuffer(4))
        info = pool.describe()
        if cfg["ucx_info"] and role == "src":
            try:
                info += ["ucp " + ln for ln in ucx_context_lines()]
            except Exception as e:  # diagnostics only
                info.append(f"ucp context info failed: {e!r}")
        conn.send(("ready", backend.metadata() if role == "dst" else None, info))
        (_serve_target if role == "dst" else _serve_source)(conn, backend, pool)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
    finally:
        if backend is not None:
            backend.close()


def _commands(conn, ppid: int, idle=None):
    """Yield commands from the parent; stop when it goes away. ``idle`` runs between polls."""
    while True:
        if conn.poll(0.0005 if idle else 1.0):
            try:
                yield conn.recv()
            except EOFError:
                return
        elif os.getppid() != ppid:
            return
        if idle:
            idle()


def _serve_source(conn, backend, pool: _Pool) -> None:
    peer = None
    for cmd in _commands(conn, os.getppid()):
        op = cmd[0]
        if op == "connect":
            peer = backend.connect(cmd[1])
            conn.send(("ok", peer))
        elif op == "run":
            conn.send(("ran", _run_writes(backend, peer, *cmd[1:])))
        elif op == "rows":
            conn.send(("rows",) + _digest(pool, cmd[1], cmd[2]))
        elif op == "ceiling":
            try:
                conn.send(("ceiling", pool.ceilings(*cmd[1:])))
            except Exception:
                conn.send(("ceiling", [("ceiling failed: " + traceback.format_exc(limit=3).replace("\n", " "), [])]))
        elif op == "exit":
            return


def _run_writes(backend, peer, tag, src, dst, warmup, repeats, timeout_s, with_aux) -> list[dict]:
    out = []
    for i in range(warmup + repeats):
        notif = f"{tag}|{i}|{time.time():.6f}".encode()
        t0 = time.perf_counter()
        try:
            h = backend.write(peer, src, dst, (0, 0) if with_aux else None, notif)
        except Exception as e:
            out.append({"i": i, "error": repr(e)})
            break
        t_post = time.perf_counter()
        st = backend.status(h)
        while st is XferStatus.PROC and time.perf_counter() - t0 < timeout_s:
            st = backend.status(h)
        t1 = time.perf_counter()
        rec = {"i": i, "post_s": t_post - t0, "total_s": t1 - t0, "state": st.value, "error": h.error}
        backend.release(h)
        if st is XferStatus.PROC:
            rec["error"] = f"not DONE after {timeout_s:.0f} s"
        out.append(rec)
        if st is not XferStatus.DONE:
            break
    return out


def _serve_target(conn, backend, pool: _Pool) -> None:
    arrivals: dict[str, list[tuple[int, float]]] = {}

    def drain():
        for m in backend.notifications():
            try:
                tag, i, t0 = m.decode().split("|")
                arrivals.setdefault(tag, []).append((int(i), time.time() - float(t0)))
            except ValueError:
                pass

    for cmd in _commands(conn, os.getppid(), idle=drain):
        if cmd[0] == "rows":
            pages, sample, tag, expected, wait_s = cmd[1:]
            t0 = time.monotonic()
            while len(arrivals.get(tag, [])) < expected and time.monotonic() - t0 < wait_s:
                drain()
                time.sleep(0.0005)
            conn.send(("rows",) + _digest(pool, pages, sample) + (arrivals.get(tag, []),))
        elif cmd[0] == "exit":
            return


# ---- the parent --------------------------------------------------------------------------------


class _Peer:
    def __init__(self, ctx, role: str, cfg: dict):
        self.role = role
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(role, child, cfg), name=f"bench-{role}", daemon=True)
        self.proc.start()
        child.close()

    def send(self, *msg) -> None:
        self.conn.send(msg)

    def recv(self, timeout: float, what: str):
        t0 = time.monotonic()
        while not self.conn.poll(0.2):
            if not self.proc.is_alive():
                raise RuntimeError(f"{self.role} process exited (code {self.proc.exitcode}) while {what}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.role}: no answer after {timeout:.0f} s while {what}")
        msg = self.conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"{self.role} failed while {what}:\n{msg[1]}")
        return msg

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("exit",))
            except (OSError, BrokenPipeError):
                pass
            self.proc.join(20)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def run_benchmark(args) -> int:
    import multiprocessing as mp

    if args.platform:
        os.environ["JAX_PLATFORMS"] = args.platform
    # Two JAX processes may share one GPU: without this each preallocates 75% of its memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

    itemsize = np.dtype(_np_dtype(args.dtype)).itemsize
    page_bytes = args.page_size * args.kv_heads * args.head_dim * itemsize
    per_page = 2 * args.layers * page_bytes  # one page, every layer, K and V
    n = max(1, round(args.mib * 2**20 / per_page))
    P = args.pool_pages or 2 * n
    if P < 2 * n:
        raise SystemExit(f"--pool-pages {P} < 2 x {n} transferred pages")
    nbytes = n * per_page
    shape = (args.layers, P, args.page_size, args.kv_heads, args.head_dim)
    base = {"shape": shape, "dtype": args.dtype, "alloc": args.alloc, "seed": args.seed,
            "ucx_info": not args.no_ucx_info, "platform": args.platform}

    print(f"== bench_transfer variant={args.env_variant} alloc={args.alloc} devices {args.src_device}->"
          f"{args.dst_device} pid={os.getpid()}", flush=True)
    print(f"   pool [L={args.layers}, P={P}, S={args.page_size}, KV={args.kv_heads}, Dh={args.head_dim}] "
          f"{args.dtype} x (K, V): page_bytes {_fmt_bytes(page_bytes)} per (buffer, layer, page), "
          f"{_fmt_bytes(per_page)} per page; {n} pages = {nbytes / 2**20:.0f} MiB per transfer", flush=True)
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith(("UCX_", "NIXL_", "XLA_PYTHON", "JAX_PLATFORMS", "CUDA_VISIBLE"))
           or k == "LD_LIBRARY_PATH"}
    print(f"   UCX_TLS={os.environ.get('UCX_TLS', '(unset: all)')}", flush=True)
    for k, v in env.items():
        print(f"   env {k}={v}", flush=True)

    ctx = mp.get_context("spawn")
    peers: list[_Peer] = []
    rows_out: list[dict] = []
    ok = True
    try:
        dst = _Peer(ctx, "dst", dict(base, device=args.dst_device))
        peers.append(dst)
        _, md, info = dst.recv(args.startup_timeout, "starting")
        for ln in info:
            print(f"[dst] {ln}", flush=True)
        src = _Peer(ctx, "src", dict(base, device=args.src_device))
        peers.append(src)
        _, _, info = src.recv(args.startup_timeout, "starting")
        for ln in info:
            print(f"[src] {ln}", flush=True)
        src.send("connect", md)
        src.recv(args.startup_timeout, "connecting")

        rng = np.random.default_rng(args.seed + 1)
        patterns = []
        if "random" in args.patterns:
            patterns.append(("random", rng.permutation(np.arange(0, 2 * n, 2))[:n],
                             rng.permutation(np.arange(1, 2 * n, 2))[:n], 2 * args.layers * n))
        if "contig" in args.patterns:
            patterns.append(("contig", np.arange(n), np.arange(n, 2 * n), 2 * args.layers))
        sample = sorted(rng.choice(n, size=min(2, n), replace=False).tolist())
        total_writes = args.warmup + args.repeats
        for name, sp, dp, ndesc in patterns:
            src.send("run", name, sp, dp, args.warmup, args.repeats, args.xfer_timeout, not args.no_aux)
            _, recs = src.recv(total_writes * (args.xfer_timeout + 5) + 30, f"writing {name}")
            errors = [r["error"] for r in recs if r.get("error")]
            timed = [r for r in recs[args.warmup:] if r.get("state") == "DONE" and not r.get("error")]
            src.send("rows", sp, sample)
            _, crc_s, smp_s = src.recv(300, "reading source pages")
            dst.send("rows", dp, sample, name, len(recs) if not errors else 0, 30.0)
            _, crc_d, smp_d, arrivals = dst.recv(300, "reading destination pages")
            bad = int(np.count_nonzero(crc_s != crc_d))
            verify = "ok" if bad == 0 and smp_s == smp_d else \
                f"BAD {bad}/{crc_s.size} rows" + ("" if smp_s == smp_d else ", sample differs")
            if errors:
                verify = "ERR " + errors[0]
            ok &= verify == "ok" and len(timed) == args.repeats
            lat = [t for i, t in arrivals if i >= args.warmup]
            rows_out.append({"variant": f"nixl WRITE {name}", "bytes": nbytes,
                             "descs": f"{2 * args.layers * n}/{ndesc}",
                             "times": [r["total_s"] for r in timed], "post": [r["post_s"] for r in timed],
                             "notif": lat, "verify": verify,
                             "notifs": f"{len(arrivals)}/{len(recs)}"})
            print(f"   {name}: {len(recs)} writes, totals ms "
                  f"{[round(r.get('total_s', float('nan')) * 1e3, 1) for r in recs]}, verify {verify}", flush=True)
        gather = patterns[0][1] if patterns else np.arange(n)
        src.send("ceiling", n, np.asarray(gather), args.dst_device, args.repeats)
        _, ceil = src.recv(600, "measuring the copy ceiling")
        for label, times in ceil:
            if not times:
                print(f"!! {label}", flush=True)
            rows_out.append({"variant": label, "bytes": nbytes, "descs": None, "times": times, "post": [],
                             "notif": [], "verify": "", "notifs": ""})
    except (RuntimeError, TimeoutError) as e:
        print(f"!! {e}", flush=True)
        ok = False
    finally:
        for p in reversed(peers):
            p.stop()

    _print_table(rows_out, args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "env": env, "rows": rows_out}, f, indent=1, default=str)
    return 0 if ok and rows_out else 1


def _print_table(rows: list[dict], args) -> None:
    ceiling = next((r for r in rows if not r["variant"].startswith("nixl") and r["times"]), None)
    ref = ceiling["bytes"] / _median(ceiling["times"]) / 1e9 if ceiling else float("nan")
    print(f"\n== results ({args.env_variant}, alloc={args.alloc}, {args.src_device}->{args.dst_device}, "
          f"median of {args.repeats} after {args.warmup} warm-up; ratio = GB/s / "
          f"{ceiling['variant'] if ceiling else 'ceiling'})", flush=True)
    hdr = f"{'variant':36s} {'bytes':>11s} {'time ms':>9s} {'GB/s':>8s} {'ratio':>7s} " \
          f"{'post ms':>8s} {'notif ms':>9s} {'descs/runs':>11s}  verify"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        t = _median(r["times"])
        gbs = r["bytes"] / t / 1e9 if r["times"] else float("nan")
        post = f"{_median(r['post']) * 1e3:8.2f}" if r["post"] else f"{'':8s}"
        notif = f"{_median(r['notif']) * 1e3:9.2f}" if r["notif"] else f"{'':9s}"
        descs = f"{r['descs'] or '':>11s}"
        print(f"{r['variant'][:36]:36s} {r['bytes']:11d} {t * 1e3:9.2f} {gbs:8.2f} {gbs / ref:7.3f} "
              f"{post} {notif} {descs}  {r['verify']}", flush=True)


# ---- entry points ------------------------------------------------------------------------------


def ucx_info_main(args) -> int:
    libs = nixl_libs_dir()
    print(f"== UCX bundled with NIXL: {libs}")
    print(f"   LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')}")
    for k, v in find_cuda_libs().items():
        print(f"   {k:18s} {v or 'NOT FOUND'}")
    print(f"   suggested LD_LIBRARY_PATH additions: {suggested_ld_path() or '(none found)'}")
    if not libs:
        return 1
    print("== dlopen of each bundled UCX module (fresh process, RTLD_LAZY|RTLD_LOCAL, as UCX does):")
    for ln in probe_ucx_modules(libs):
        print("   " + ln)
    if args.with_jax:
        import jax

        print(f"== JAX devices (libcuda now loaded in this process): {jax.devices()}")
    print("== UCP context resources in this process (ucx_info -d in short):")
    for ln in ucx_context_lines(libs):
        print("   " + ln)
    sys.stdout.flush()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=float, default=512, help="bytes per transfer (all layers, K and V)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--pool-pages", type=int, default=0, help="pages per pool (default 2x transferred)")
    ap.add_argument("--src-device", type=int, default=0, help="index into jax.devices() (torch/cupy: CUDA ordinal)")
    ap.add_argument("--dst-device", type=int, default=0)
    ap.add_argument("--alloc", choices=("jax", "torch", "cupy"), default="jax",
                    help="who allocates the pools: JAX (XLA VMM memory) or cudaMalloc via torch/cupy")
    ap.add_argument("--platform", default="", help="JAX_PLATFORMS for the workers (e.g. cpu)")
    ap.add_argument("--patterns", default="random,contig")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-aux", action="store_true", help="pages only (no aux record / second stage)")
    ap.add_argument("--xfer-timeout", type=float, default=120)
    ap.add_argument("--startup-timeout", type=float, default=240)
    ap.add_argument("--env-variant", default="default", help="label for the UCX_* environment in use")
    ap.add_argument("--no-ucx-info", action="store_true", help="skip the UCP resource listing in src")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--ucx-info", action="store_true", help="print UCX module/resource diagnostics and exit")
    ap.add_argument("--with-jax", action="store_true", help="with --ucx-info: initialise JAX first")
    ap.add_argument("--ld-path", action="store_true", help="print LD_LIBRARY_PATH additions and exit")
    args = ap.parse_args(argv)
    if args.ld_path:
        print(suggested_ld_path())
        return 0
    if args.ucx_info:
        return ucx_info_main(args)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
