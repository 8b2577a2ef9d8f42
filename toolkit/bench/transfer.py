"""KV page transfer bandwidth through ``NixlBackend`` between two OS processes.

    python -m toolkit.bench.transfer                                       # one GPU, two processes
    python -m toolkit.bench.transfer bench.dst_device=1                    # GPU 0 -> GPU 1
    python -m toolkit.bench.transfer bench.alloc=torch                     # cudaMalloc'd pools
    python -m toolkit.bench.transfer -m bench.alloc=jax,torch bench.json_out=xfer.json   # xfer-0.json, ...
    python -m toolkit.bench.transfer bench.platform=cpu bench.mib=1 bench.layers=2 bench.repeats=2  # CPU

Two spawned processes (``dst``: the target, like decode; ``src``: the initiator, like
prefill) each own a page-major KV pool ``[P, L, S, KV, Dh]`` x (K, V) on the chosen device
(``bench.alloc=jax``: JAX arrays; ``torch``/``cupy``: raw ``cudaMalloc`` memory, see
``transfer_pools``). ``src`` connects to ``dst`` and times ``write()`` -> status DONE for

    random   ``bench.mib`` worth of pages, a shuffled set of even pages into a shuffled set
             of odd pages: no two consecutive descriptors are address-adjacent, so nothing
             merges (2*n descriptors of ``page_bytes``: one page of every layer)
    contig   pages 0..n-1 into pages n..2n-1: NIXL can merge each buffer's run into one
             descriptor (2 descriptors of n*page_bytes)
    rooms    the random pages as ``bench.rooms`` writes posted back to back (concurrent
             rooms, each with its aux record and notification), timed until all are DONE
    staged   the staging path: ``src`` gathers the random pages into a contiguous region
             of its pool (pages 2n..3n-1), writes that region into the same region of
             ``dst`` (2 descriptors), and ``dst`` scatters it to the random destination
             pages when the notification arrives; time = gather + write + scatter

each with the aux record and a notification (the real two-stage write when the pools are
VRAM), median over ``bench.repeats`` after ``bench.warmup``. The bytes are verified
afterwards (a CRC of every transferred (buffer, page) piece on both sides, plus two
sampled pages compared byte for byte through host copies), and the same number of bytes
is copied in ``src`` as the ceiling (same device: a slice copy and a page gather; two
devices: a device-to-device put; CPU: numpy copies). The table comes last.

UCX reads its ``UCX_*`` settings from the environment: set them around this command
(``bench.env_variant`` is only the label stored with the results). What UCX loads and
why: ``python -m toolkit.disagg.diagnose``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback

import numpy as np

from toolkit.bench import config, core
from toolkit.bench.transfer_pools import Pool, digest, make_pool, np_dtype
from toolkit.cli import hydra_main
from toolkit.config.validate import ConfigError
from toolkit.disagg import diagnose
from toolkit.disagg.transfer import AuxBuffer, XferStatus

config.register()
COLS = ["variant", "bytes", "time_ms", "GB_s", "ratio", "post_ms", "notif_ms", "descs_runs", "verify"]

# ---- the two processes --------------------------------------------------------------------------


def _child(role: str, conn, cfg: dict) -> None:
    backend = None
    try:
        from toolkit.disagg.nixl_backend import NixlBackend

        pool = make_pool(cfg, cfg["seed"] if role == "src" else None)
        ucx = {}
        if cfg.get("ucx_threads"):
            ucx["num_threads"] = cfg["ucx_threads"]
        if cfg.get("split_batch"):
            ucx["split_batch_size"] = cfg["split_batch"]
        backend = NixlBackend(f"bench-{role}-{os.getpid()}", pool.layout(), AuxBuffer(4),
                              backend_params={"UCX": ucx} if ucx else None)
        info = pool.describe()
        if cfg["ucx_info"] and role == "src":
            try:
                info += ["ucp " + ln for ln in diagnose.ucx_context_lines()]
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


def _serve_source(conn, backend, pool: Pool) -> None:
    peer = None
    for cmd in _commands(conn, os.getppid()):
        op = cmd[0]
        if op == "connect":
            peer = backend.connect(cmd[1])
            conn.send(("ok", peer))
        elif op == "run":
            conn.send(("ran", _run_writes(backend, pool, peer, *cmd[1:])))
        elif op == "rows":
            conn.send(("rows",) + digest(pool, cmd[1], cmd[2]))
        elif op == "ceiling":
            try:
                conn.send(("ceiling", pool.ceilings(*cmd[1:])))
            except Exception:
                conn.send(("ceiling", [("ceiling failed: " + traceback.format_exc(limit=3).replace("\n", " "), [])]))
        elif op == "exit":
            return


def _staging_region(n: int) -> np.ndarray:
    """The staged pattern's contiguous pages on both sides (pool_shape sizes pools for it)."""
    return np.arange(2 * n, 3 * n)


def _writes(backend, pool: Pool, peer, tag: str, i: int, src, dst, with_aux: bool, rooms: int) -> list:
    """Post one repetition of a pattern: the handles to poll (the last carries the tag)."""
    notif = f"{tag}|{i}|{time.time():.6f}".encode()
    if tag == "staged":
        region = _staging_region(len(src))
        pool.stage(src, region)  # gather, waited on: the write must read the gathered pages
        src = dst = region
    if tag != "rooms":
        return [backend.write(peer, src, dst, (0, 0) if with_aux else None, notif)]
    parts = list(zip(np.array_split(src, rooms), np.array_split(dst, rooms)))
    return [backend.write(peer, sp, dp, (r % 4, r % 4) if with_aux else None,
                          notif if r == len(parts) - 1 else b"room-%d" % r)
            for r, (sp, dp) in enumerate(parts)]


def _run_writes(backend, pool: Pool, peer, tag, src, dst, warmup, repeats, timeout_s, with_aux, rooms) -> list[dict]:
    out = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        try:
            hs = _writes(backend, pool, peer, tag, i, src, dst, with_aux, rooms)
        except Exception as e:
            out.append({"i": i, "error": repr(e)})
            break
        t_post = time.perf_counter()
        states = [backend.status(h) for h in hs]
        while any(st is XferStatus.PROC for st in states) and time.perf_counter() - t0 < timeout_s:
            states = [backend.status(h) for h in hs]
        t1 = time.perf_counter()
        st = next((x for x in states if x is not XferStatus.DONE), XferStatus.DONE)
        rec = {"i": i, "post_s": t_post - t0, "total_s": t1 - t0, "state": st.value,
               "error": next((h.error for h in hs if h.error), None)}
        for h in hs:
            backend.release(h)
        if st is XferStatus.PROC:
            rec["error"] = f"not DONE after {timeout_s:.0f} s"
        out.append(rec)
        if st is not XferStatus.DONE:
            break
    return out


def _serve_target(conn, backend, pool: Pool) -> None:
    arrivals: dict[str, list[tuple[int, float]]] = {}

    staged: dict[int, float] = {}  # repetition -> seconds of the target's scatter
    staged_dst = [np.zeros(0, np.int64)]  # the staged pattern's destination pages ("expect")

    def drain():
        for m in backend.notifications():
            try:
                tag, i, t0 = m.decode().split("|")
            except ValueError:
                continue  # a room's own notification (only the last one is tagged)
            arrivals.setdefault(tag, []).append((int(i), time.time() - float(t0)))
            if tag == "staged":
                t = time.perf_counter()
                pool.unstage(_staging_region(len(staged_dst[0])), staged_dst[0])
                staged[int(i)] = time.perf_counter() - t

    for cmd in _commands(conn, os.getppid(), idle=drain):
        if cmd[0] == "expect":  # the destination pages of the staged pattern, before it runs
            staged_dst[0] = np.asarray(cmd[1], np.int64)
            conn.send(("ok",))
        elif cmd[0] == "rows":
            pages, sample, tag, expected, wait_s = cmd[1:]
            t0 = time.monotonic()
            while len(arrivals.get(tag, [])) < expected and time.monotonic() - t0 < wait_s:
                drain()
                time.sleep(0.0005)
            conn.send(("rows",) + digest(pool, pages, sample) + (arrivals.get(tag, []), dict(staged)))
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


def pool_shape(b: config.TransferBench) -> tuple[tuple[int, ...], int, int]:
    """(pool shape [P, L, S, KV, Dh], pages per transfer n, bytes of one (buffer, page): a
    page of every layer)."""
    page_bytes = b.layers * b.page_size * b.kv_heads * b.head_dim * np.dtype(np_dtype(b.dtype)).itemsize
    per_page = 2 * page_bytes  # one page, every layer, K and V
    n = max(1, round(b.mib * 2**20 / per_page))
    need = (3 if "staged" in b.patterns else 2) * n  # the staged pattern's region: pages 2n..3n-1
    P = b.pool_pages or need
    if P < need:
        raise ConfigError(f"bench.pool_pages={P} < {need // n} x {n} transferred pages")
    return (P, b.layers, b.page_size, b.kv_heads, b.head_dim), n, page_bytes


def _environment() -> dict:
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("UCX_", "NIXL_", "XLA_PYTHON", "JAX_PLATFORMS", "CUDA_VISIBLE")) or k == "LD_LIBRARY_PATH"}


def _start(ctx, b: config.TransferBench, base: dict) -> tuple[_Peer, _Peer]:
    """Start dst, then src, and connect src to dst; each prints what its pool is."""
    dst = _Peer(ctx, "dst", dict(base, device=b.dst_device))
    try:
        _, md, info = dst.recv(b.startup_timeout_s, "starting")
        for ln in info:
            print(f"[dst] {ln}", file=sys.stderr)
        src = _Peer(ctx, "src", dict(base, device=b.src_device))
        try:
            _, _, info = src.recv(b.startup_timeout_s, "starting")
            for ln in info:
                print(f"[src] {ln}", file=sys.stderr)
            src.send("connect", md)
            src.recv(b.startup_timeout_s, "connecting")
        except BaseException:
            src.stop()
            raise
    except BaseException:
        dst.stop()
        raise
    return src, dst


def _patterns(b: config.TransferBench, n: int, rng) -> list[tuple]:
    """(name, source pages, destination pages, descriptors before merging)."""
    def scattered(name):  # shuffled even pages into shuffled odd pages: nothing merges
        return (name, rng.permutation(np.arange(0, 2 * n, 2))[:n], rng.permutation(np.arange(1, 2 * n, 2))[:n],
                2 * n)

    out = [scattered("random")] if "random" in b.patterns else []
    if "contig" in b.patterns:
        out.append(("contig", np.arange(n), np.arange(n, 2 * n), 2))
    return out + [scattered(name) for name in ("rooms", "staged") if name in b.patterns]


def _write_pattern(src: _Peer, dst: _Peer, b: config.TransferBench, pattern: tuple, sample: list[int],
                   n: int, nbytes: int) -> dict:
    """Time the writes of one pattern, then verify both sides' pages: one raw result."""
    name, sp, dp, ndesc = pattern
    if name == "staged":
        dst.send("expect", dp)
        dst.recv(30, "setting the staged destination")
    src.send("run", name, sp, dp, b.warmup, b.repeats, b.xfer_timeout_s, b.aux, b.rooms)
    _, recs = src.recv((b.warmup + b.repeats) * (b.xfer_timeout_s + 5) + 30, f"writing {name}")
    errors = [r["error"] for r in recs if r.get("error")]
    timed = [r for r in recs[b.warmup:] if r.get("state") == "DONE" and not r.get("error")]
    src.send("rows", sp, sample)
    _, crc_s, smp_s = src.recv(300, "reading source pages")
    dst.send("rows", dp, sample, name, len(recs) if not errors else 0, 30.0)
    _, crc_d, smp_d, arrivals, scatter = dst.recv(300, "reading destination pages")
    bad = int(np.count_nonzero(crc_s != crc_d))
    verify = "ok" if bad == 0 and smp_s == smp_d else \
        f"BAD {bad}/{crc_s.size} rows" + ("" if smp_s == smp_d else ", sample differs")
    if errors:
        verify = "ERR " + errors[0]
    print(f"   {name}: {len(recs)} writes, totals ms "
          f"{[round(r.get('total_s', float('nan')) * 1e3, 1) for r in recs]}, verify {verify}", file=sys.stderr)
    if name == "staged":  # gather + write (src) + scatter (dst, after the notification)
        times = [r["total_s"] + scatter.get(r["i"], float("nan")) for r in timed]
        ndesc = 2
    else:
        times = [r["total_s"] for r in timed]
    label = {"rooms": f"rooms x{b.rooms}", "staged": "staged (gather, write, scatter)"}.get(name, name)
    return {"variant": f"nixl WRITE {label}", "bytes": nbytes, "descs": f"{2 * n}/{ndesc}",
            "times": times, "post": [r["post_s"] for r in timed],
            "notif": [t for i, t in arrivals if i >= b.warmup], "verify": verify,
            "notifs": f"{len(arrivals)}/{len(recs)}", "ok": verify == "ok" and len(timed) == b.repeats}


def run_bench(b: config.TransferBench) -> tuple[list[dict], bool]:
    """Raw results (seconds per repetition) of every pattern and of the ceilings, and
    whether every write completed and verified."""
    import multiprocessing as mp

    if b.platform:
        os.environ["JAX_PLATFORMS"] = b.platform
    # Two JAX processes may share one GPU: without this each preallocates 75% of its memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    shape, n, page_bytes = pool_shape(b)
    nbytes = n * 2 * page_bytes
    print(f"== transfer variant={b.env_variant} alloc={b.alloc} devices {b.src_device}->{b.dst_device}: pool "
          f"{list(shape)} {b.dtype} x (K, V), {_fmt_bytes(page_bytes)} per (buffer, page); {n} pages = "
          f"{nbytes / 2**20:.0f} MiB per transfer", file=sys.stderr)
    for k, v in _environment().items():
        print(f"   env {k}={v}", file=sys.stderr)
    base = {"shape": shape, "dtype": b.dtype, "alloc": b.alloc, "seed": b.seed, "ucx_info": b.ucx_info,
            "platform": b.platform, "ucx_threads": b.ucx_threads, "split_batch": b.split_batch}
    raw, ok = [], True
    try:
        src, dst = _start(mp.get_context("spawn"), b, base)
    except (RuntimeError, TimeoutError) as e:
        print(f"!! {e}", file=sys.stderr)
        return raw, False
    try:
        rng = np.random.default_rng(b.seed + 1)
        patterns = _patterns(b, n, rng)
        sample = sorted(rng.choice(n, size=min(2, n), replace=False).tolist())
        for p in patterns:
            raw.append(_write_pattern(src, dst, b, p, sample, n, nbytes))
            ok &= raw[-1].pop("ok")
        gather = patterns[0][1] if patterns else np.arange(n)
        src.send("ceiling", n, np.asarray(gather), b.dst_device, b.repeats)
        _, ceil = src.recv(600, "measuring the copy ceiling")
        for label, times in ceil:
            if not times:
                print(f"!! {label}", file=sys.stderr)
            raw.append({"variant": label, "bytes": nbytes, "descs": "", "times": times, "post": [], "notif": [],
                        "verify": "", "notifs": ""})
    except (RuntimeError, TimeoutError) as e:
        print(f"!! {e}", file=sys.stderr)
        ok = False
    finally:
        src.stop()
        dst.stop()
    return raw, ok


def table_rows(raw: list[dict]) -> list[dict]:
    """Medians in ms and GB/s; ratio against the first ceiling measured in the same run."""
    ceiling = next((r for r in raw if not r["variant"].startswith("nixl") and r["times"]), None)
    ref = ceiling["bytes"] / _median(ceiling["times"]) / 1e9 if ceiling else float("nan")
    rows = []
    for r in raw:
        t = _median(r["times"])
        gbs = r["bytes"] / t / 1e9 if r["times"] else float("nan")
        rows.append({"variant": r["variant"], "bytes": r["bytes"], "time_ms": t * 1e3, "GB_s": gbs,
                     "ratio": gbs / ref, "post_ms": _median(r["post"]) * 1e3, "notif_ms": _median(r["notif"]) * 1e3,
                     "descs_runs": r["descs"], "verify": r["verify"]})
    return rows


def _nixl_version() -> str:
    from importlib import metadata

    for dist in ("nixl", "nixl-cu12", "nixl-cu13"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def job(cfg: config.TransferRun) -> None:
    b = cfg.bench
    raw, ok = run_bench(b)
    rows = table_rows(raw)
    # only now, the two processes gone: the card's JAX may take a device context here
    card = core.device_card(nixl=_nixl_version(), alloc=b.alloc, devices=f"{b.src_device}->{b.dst_device}",
                            ucx_env=b.env_variant)
    ceiling = next((r["variant"] for r in raw if not r["variant"].startswith("nixl") and r["times"]), "ceiling")
    core.report("transfer", rows, COLS, card=card, config=b, json_out=b.json_out,
                extra={"env": _environment(), "raw": raw},
                title=f"KV page WRITEs through NIXL between two processes: median of {b.repeats} after "
                      f"{b.warmup} warm-up; ratio = GB/s / {ceiling} (same run)")
    if not (ok and rows):
        sys.exit(1)



main = hydra_main(job, config_name="bench/transfer")

if __name__ == "__main__":
    main()
