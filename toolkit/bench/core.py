"""What every benchmark shares: the timing loop, the copy and matmul ceilings, the device
card, the table (printed last on stdout) and the JSON file.

Numbers are only comparable within one run: each benchmark measures its ceilings in the
same process it measures itself, and prints the device card (GPU, driver, JAX version,
date) with every table and stores it in the JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

# ---- timing -----------------------------------------------------------------------------------


def _block(out):
    import jax

    return jax.block_until_ready(out)


def time_calls(fn: Callable, *args, sync: Optional[Callable] = None, warmup: int = 3, iters: int = 20,
               reps: int = 5) -> list[float]:
    """Seconds per call of ``fn(*args)`` in each of ``reps`` repetitions: ``iters`` calls
    issued back to back (no host sync between them, as in a serving loop), then one
    ``sync(last output)`` (default ``jax.block_until_ready``; one stream, so the last call
    ends last, and earlier outputs may have been donated). The warm-up calls compile."""
    sync = sync or _block
    for _ in range(warmup):
        sync(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = [fn(*args) for _ in range(iters)]
        sync(out[-1])
        times.append((time.perf_counter() - t0) / iters)
        del out
    return times


def bench(fn: Callable, *args, **kw) -> float:
    """The median repetition of ``time_calls``: seconds per call."""
    return float(statistics.median(time_calls(fn, *args, **kw)))


# ---- ceilings ---------------------------------------------------------------------------------


def copy_ceilings(nbytes: int, torch_copy: bool = True) -> list[tuple[str, float, float]]:
    """(name, seconds, bytes/s counting read + write) of a large device-to-device copy:
    an XLA copy and, on a GPU where torch is present, torch's ``copy_``. The bandwidth
    ceiling of every benchmark is the best of them (``copy_bandwidth``)."""
    import jax
    import jax.numpy as jnp

    out = []
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    t = bench(jax.jit(lambda a: a * jnp.bfloat16(1.0001)), x, iters=10)
    out.append(("device copy, XLA (read+write)", t, 2 * nbytes / t))
    del x
    if torch_copy and jax.devices()[0].platform == "gpu":
        try:
            out.append(_torch_copy(nbytes))
        except Exception as e:  # noqa: BLE001 -- torch is optional
            print(f"torch copy skipped: {e}", file=sys.stderr)
    return out


def _torch_copy(nbytes: int) -> tuple[str, float, float]:
    import torch

    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), sync=lambda _: torch.cuda.synchronize(), iters=10)
    del a, b
    torch.cuda.empty_cache()
    return ("device copy, torch (read+write)", t, 2 * nbytes / t)


def copy_bandwidth(nbytes: int, torch_copy: bool = True) -> float:
    """Bytes/s (read + write) of the best device copy: the memory roofline's bandwidth."""
    return max(b for _, _, b in copy_ceilings(nbytes, torch_copy))


def matmul_ceiling(m: int) -> tuple[float, float]:
    """(seconds, FLOP/s) of an [m, m] @ [m, m] bfloat16 matmul: the compute ceiling."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    t = bench(jax.jit(lambda p, q: p @ q), a, b)
    return t, 2 * m ** 3 / t


# ---- the device card --------------------------------------------------------------------------


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return out[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def host_card(**extra) -> dict:
    """The card of a benchmark that drives another process's device (the load generator):
    no JAX here (initialising it on a GPU host would take memory from the server)."""
    return {**extra, "python": platform.python_version(), "date": utc_now()}


def device_card(**extra) -> dict:
    """What the numbers were measured on: device kind and count, driver, JAX version, date.
    ``extra`` adds benchmark-specific facts (e.g. the NIXL version)."""
    import jax

    dev = jax.devices()[0]
    card = {"device": dev.device_kind, "platform": dev.platform, "num_devices": jax.device_count(),
            "driver": _nvidia_driver() if dev.platform == "gpu" else "n/a", "jax": jax.__version__,
            "python": platform.python_version(), "date": utc_now()}
    return {**card, **extra}


def card_line(card: dict) -> str:
    skip = ("platform",)
    return "# " + " | ".join(f"{k} {v}" for k, v in card.items() if k not in skip)


# ---- the table and the JSON -------------------------------------------------------------------


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def format_table(rows: list[dict], cols: list[str]) -> list[str]:
    """A Markdown table (pastes into docs/benchmarks.md), columns padded to their widths."""
    cells = [[_cell(r.get(c, "")) for c in cols] for r in rows]
    width = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    # numbers right-aligned, text left-aligned (in the terminal and once rendered)
    num = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in cols]

    def line(xs):
        return "| " + " | ".join(x.rjust(w) if n else x.ljust(w) for x, w, n in zip(xs, width, num)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + (":" if n else "-") for w, n in zip(width, num)) + "|"
    return [line(cols), rule] + [line(r) for r in cells]


def parse_table(text: str) -> list[dict]:
    """The rows of the last table ``format_table`` printed in ``text`` (for tests and scripts)."""
    lines = text.rstrip().splitlines()
    end = len(lines)
    while end and not lines[end - 1].startswith("|"):
        end -= 1
    start = end
    while start and lines[start - 1].startswith("|"):
        start -= 1
    split = lambda s: [c.strip() for c in s.strip().strip("|").split("|")]  # noqa: E731
    cols = split(lines[start])
    return [dict(zip(cols, split(s))) for s in lines[start + 2:end]]


def json_path(name: str, json_out: str) -> str:
    """Where this run's JSON goes. A single run: ``json_out`` ("" = none). A Hydra multirun
    (``-m``): one file per job, ``<stem>-<job number><suffix>`` when ``json_out`` is given,
    else ``<name>.json`` in the job's Hydra output directory."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not under @hydra.main
        return json_out
    if hc.mode != RunMode.MULTIRUN:
        return json_out
    if json_out:
        stem, suffix = os.path.splitext(json_out)
        return f"{stem}-{hc.job.num}{suffix or '.json'}"
    return os.path.join(hc.runtime.output_dir, f"{name}.json")


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return sys.argv[1:]


def report(name: str, rows: list[dict], cols: list[str], *, card: dict, config: Any = None, json_out: str = "",
           title: str = "", notes: tuple[str, ...] = (), extra: Optional[dict] = None) -> Optional[str]:
    """Print ``title``, the device card, ``notes`` and the table of ``rows`` (the last thing
    on stdout), and write the JSON (card, command-line overrides, config, rows, ``extra``).
    Returns the JSON's path, if one was written."""
    for line in ([title] if title else []) + [card_line(card), *notes, *format_table(rows, cols)]:
        print(line)
    sys.stdout.flush()
    path = json_path(name, json_out)
    if path:
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
        doc = {"benchmark": name, "card": card, "overrides": _overrides(), "config": cfg, "rows": rows,
               **(extra or {})}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"wrote {path}", file=sys.stderr)
    return path or None
