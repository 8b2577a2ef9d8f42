"""The KV pools of the transfer benchmark's two processes, and the same-process copies of
the same bytes that serve as its ceiling.

A pool is K and V ``[P, L, S, KV, Dh]`` (page-major, as a ``KVPool``) on one device, allocated by JAX (XLA's VMM memory,
as a ``KVPool`` would be with ``engine.kv_alloc=xla``), torch or cupy (both ``cudaMalloc``:
legacy-CUDA-IPC capable, so UCX's ``cuda_ipc`` can map them). These ceilings are specific
to pools living in other processes; their timing loop is the shared one (``core``).
"""

from __future__ import annotations

import zlib
from typing import Optional

import numpy as np

from toolkit.bench import core
from toolkit.disagg.diagnose import cuda_pointer_info
from toolkit.cache.pool import PoolLayout


def _random_bits(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Random finite values of ``dtype``: random bits with the exponent's top bit cleared."""
    n = int(np.prod(shape)) * dtype.itemsize
    raw = rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]
    if dtype.itemsize in (2, 4, 8):
        u = raw.view(f"<u{dtype.itemsize}")
        u &= ~np.array(1 << (8 * dtype.itemsize - 2), u.dtype)
    return raw.view(dtype).reshape(shape)


class Pool:
    """K and V buffers ``[P, L, S, KV, Dh]`` on one device, plus what the benchmark needs."""

    gpu: bool
    device_id: int

    def __init__(self, cfg: dict, fill_seed: Optional[int]):
        self.cfg = cfg
        self.shape = tuple(cfg["shape"])
        self.dtype = np.dtype(np_dtype(cfg["dtype"]))
        self.page_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize  # one page, every layer
        self.host = None
        if fill_seed is not None:
            rng = np.random.default_rng(fill_seed)
            self.host = (_random_bits(rng, self.shape, self.dtype), _random_bits(rng, self.shape, self.dtype))

    def pointers(self) -> tuple[int, int]:
        raise NotImplementedError

    def gather_host(self, pages: np.ndarray) -> np.ndarray:
        """[2, n, L, ...] host copy of the pages (in this order)."""
        raise NotImplementedError

    def ceilings(self, n: int, gather: np.ndarray, dst_index: int, repeats: int) -> list[tuple[str, list[float]]]:
        raise NotImplementedError

    def stage(self, pages: np.ndarray, region: np.ndarray) -> None:
        """The staging path's gather: copy ``pages`` (every layer, K and V) into the
        consecutive pages ``region`` of the same pool, in place, and wait for it."""
        raise NotImplementedError(f"the staged pattern is not implemented for alloc={self.cfg['alloc']}")

    def unstage(self, region: np.ndarray, pages: np.ndarray) -> None:
        """The staging path's scatter: the inverse of ``stage``, in place, waited on."""
        raise NotImplementedError(f"the staged pattern is not implemented for alloc={self.cfg['alloc']}")

    def layout(self) -> PoolLayout:
        P, L, S, KV, Dh = self.shape
        return PoolLayout(L, P, S, KV, Dh, self.cfg["dtype"]).placed(
            "VRAM" if self.gpu else "DRAM", self.device_id if self.gpu else 0, self.pointers())

    def rows(self, pages: np.ndarray) -> np.ndarray:
        """uint8 [2, n, page_bytes]: the bytes of each (buffer, page) descriptor."""
        h = np.ascontiguousarray(self.gather_host(np.asarray(pages, np.int64)))
        return h.view(np.uint8).reshape(2, len(pages), self.page_bytes)

    def describe(self) -> list[str]:
        k, v = self.pointers()
        mib = 2 * np.prod(self.shape) * self.dtype.itemsize / 2**20
        lines = [f"pool {self.cfg['alloc']} {'VRAM' if self.gpu else 'DRAM'} device {self.device_id} "
                 f"shape {self.shape} x2 {self.cfg['dtype']} = {mib:.0f} MiB, K at {k:#x}, V at {v:#x}"]
        if self.gpu:
            lines.append("cuda " + cuda_pointer_info(k, self.device_id))
        return lines


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _timed(fn, sync, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls, each waited on (``sync``) after one warm-up call:
    the shared timing loop, one call per repetition (a transfer-sized copy is long enough
    to time alone)."""
    return core.time_calls(fn, sync=sync, warmup=1, iters=1, reps=repeats)


def _numpy_ceilings(hk: np.ndarray, hv: np.ndarray, n: int, gather: np.ndarray, repeats: int):
    """DRAM pools: numpy copies of the same bytes (contiguous) and of the same pages (gather)."""
    src = (np.ascontiguousarray(hk[:n]), np.ascontiguousarray(hv[:n]))
    dst = (np.empty_like(src[0]), np.empty_like(src[1]))
    outk, outv = np.empty_like(src[0]), np.empty_like(src[1])

    def copy():
        np.copyto(dst[0], src[0])
        np.copyto(dst[1], src[1])

    def take():
        np.take(hk, gather, axis=0, out=outk)
        np.take(hv, gather, axis=0, out=outv)

    return [("numpy copy (same bytes)", _timed(copy, lambda _: None, repeats)),
            ("numpy take (same pages)", _timed(take, lambda _: None, repeats))]


class _JaxPool(Pool):
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
        self._gather = jax.jit(lambda k, v, i: jnp.stack([k[i], v[i]]))

    def pointers(self):
        return self.k.unsafe_buffer_pointer(), self.v.unsafe_buffer_pointer()

    def _move(self, fn, a: np.ndarray, b: np.ndarray) -> None:
        before = self.pointers()
        ia, ib = (self.jax.device_put(np.asarray(x, np.int32), self.dev) for x in (a, b))
        self.k, self.v = fn(self.k, self.v, ia, ib)
        self.jax.block_until_ready((self.k, self.v))
        assert self.pointers() == before, "donated pool moved: NIXL registered the old address"

    def stage(self, pages, region):
        if not hasattr(self, "_stage"):
            from kernels.attention_ref import gather_pages, scatter_pages

            move = lambda x, i, j: scatter_pages(x, j, gather_pages(x, i))  # noqa: E731
            self._stage = self.jax.jit(lambda k, v, i, j: (move(k, i, j), move(v, i, j)), donate_argnums=(0, 1))
        self._move(self._stage, pages, region)

    def unstage(self, region, pages):
        self.stage(region, pages)  # the same page-to-page move, the other way

    def gather_host(self, pages):
        # A jitted gather reads the device memory as it is now (never a cached host copy).
        idx = self.jax.device_put(pages.astype(np.int32), self.dev)
        return np.asarray(self.jax.device_get(self._gather(self.k, self.v, idx)))

    def ceilings(self, n, gather, dst_index, repeats):
        jax = self.jax
        sync = jax.block_until_ready
        if not self.gpu:
            return _numpy_ceilings(np.asarray(self.k), np.asarray(self.v), n, gather, repeats)
        sl = jax.jit(lambda k, v: (k[:n], v[:n]))
        if dst_index == self.cfg["device"]:
            idx = jax.device_put(gather.astype(np.int32), self.dev)
            ga = jax.jit(lambda k, v, i: (k[i], v[i]))
            return [("jit slice copy (same device)", _timed(lambda: sl(self.k, self.v), sync, repeats)),
                    ("jit page gather (same device)", _timed(lambda: ga(self.k, self.v, idx), sync, repeats))]
        a = sync(sl(self.k, self.v))
        other = jax.devices()[dst_index]
        return [(f"jax.device_put {self.device_id}->{other.id}",
                 _timed(lambda: jax.device_put(a, other), sync, repeats))]


class _TorchPool(Pool):
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

    def stage(self, pages, region):
        # One pass: gather straight into the region. torch refuses an output overlapping its
        # input, so the input is the pool below the region (every pattern page is < region[0]).
        i = self.torch.as_tensor(np.asarray(pages), dtype=self.torch.long, device=self.dev)
        r0, r1 = int(region[0]), int(region[-1]) + 1
        for t in (self.k, self.v):
            self.torch.index_select(t[:r0], 0, i, out=t[r0:r1])
        self._sync(None)

    def unstage(self, region, pages):
        i = self.torch.as_tensor(np.asarray(pages), dtype=self.torch.long, device=self.dev)
        r0, r1 = int(region[0]), int(region[-1]) + 1
        for t in (self.k, self.v):
            t[:r0].index_copy_(0, i, t[r0:r1])
        self._sync(None)

    def gather_host(self, pages):
        i = self.torch.as_tensor(pages, dtype=self.torch.long, device=self.dev)
        return self.torch.stack([self.k[i], self.v[i]]).cpu().numpy()

    def ceilings(self, n, gather, dst_index, repeats):
        torch = self.torch
        if not self.gpu:
            return _numpy_ceilings(self.k.numpy(), self.v.numpy(), n, gather, repeats)
        if dst_index == self.cfg["device"]:
            i = torch.as_tensor(gather, dtype=torch.long, device=self.dev)
            return [("torch slice clone (same device)",
                     _timed(lambda: (self.k[:n].clone(), self.v[:n].clone()), self._sync, repeats)),
                    ("torch page gather (same device)",
                     _timed(lambda: (self.k[i], self.v[i]), self._sync, repeats))]
        a = (self.k[:n].contiguous(), self.v[:n].contiguous())
        other = torch.device(f"cuda:{dst_index}")

        def sync(_):
            torch.cuda.synchronize(self.dev)
            torch.cuda.synchronize(other)

        return [(f"torch .to cuda:{self.device_id}->cuda:{dst_index}",
                 _timed(lambda: (a[0].to(other), a[1].to(other)), sync, repeats))]


class _CupyPool(Pool):
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
            return cp.asnumpy(cp.stack([self.k[i], self.v[i]]))

    def ceilings(self, n, gather, dst_index, repeats):
        cp = self.cp
        with cp.cuda.Device(self.device_id):
            if dst_index == self.device_id:
                i = cp.asarray(gather)
                return [("cupy slice copy (same device)",
                         _timed(lambda: (cp.ascontiguousarray(self.k[:n]), cp.ascontiguousarray(self.v[:n])),
                                self._sync, repeats)),
                        ("cupy page gather (same device)",
                         _timed(lambda: (self.k[i], self.v[i]), self._sync, repeats))]
            a = (cp.ascontiguousarray(self.k[:n]), cp.ascontiguousarray(self.v[:n]))
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


def make_pool(cfg: dict, fill_seed: Optional[int]) -> Pool:
    return {"jax": _JaxPool, "torch": _TorchPool, "cupy": _CupyPool}[cfg["alloc"]](cfg, fill_seed)


def digest(pool: Pool, pages: np.ndarray, sample: list[int]) -> tuple[np.ndarray, bytes]:
    rows = pool.rows(pages)
    flat = rows.reshape(-1, rows.shape[-1])
    crc = np.fromiter((zlib.crc32(r) for r in flat), np.uint32, count=flat.shape[0]).reshape(rows.shape[:2])
    return crc, rows[:, sample].tobytes()
