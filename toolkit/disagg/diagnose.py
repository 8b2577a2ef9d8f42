"""What UCX (bundled with the NIXL wheel) finds on this machine: the libraries its CUDA
modules need, which of its modules load, and the transports of a UCP context.

    python -m toolkit.disagg.diagnose                # UCX modules and resources in this process
    python -m toolkit.disagg.diagnose --with-jax     # the same after JAX initialised the GPUs
    python -m toolkit.disagg.diagnose --ld-path      # dirs to prepend to LD_LIBRARY_PATH, one line

Read it when NIXL transfers between GPUs are slow or fail. The findings it led to (pools
in XLA's VMM memory get no ``cuda_ipc`` lane; ``engine.kv_alloc=auto`` allocates them with
cudaMalloc) are in docs/benchmarks.md. UCX prints more with ``UCX_LOG_LEVEL=info
UCX_MODULE_LOG_LEVEL=info`` (every module it fails to dlopen, and why) and
``UCX_PROTO_INFO=y`` (the protocol picked per operation: ``zero-copy cuda_ipc/cuda`` is the
fast path for GPU-to-GPU puts, ``software emulation ... tcp`` the slow one).
No JAX and no NIXL import is needed for the library checks.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import site
import subprocess
import sys
import tempfile
from typing import Any, Optional

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


def ucx_report(with_jax: bool = False) -> int:
    """Print where UCX and the CUDA libraries are, which UCX modules load, and the UCP
    resources of this process; 1 if the NIXL wheel's UCX is not found."""
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
    if with_jax:
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
    ap.add_argument("--with-jax", action="store_true", help="initialise JAX (and so libcuda) first")
    ap.add_argument("--ld-path", action="store_true", help="print LD_LIBRARY_PATH additions and exit")
    args = ap.parse_args(argv)
    if args.ld_path:
        print(suggested_ld_path())
        return 0
    return ucx_report(with_jax=args.with_jax)


if __name__ == "__main__":
    sys.exit(main())
