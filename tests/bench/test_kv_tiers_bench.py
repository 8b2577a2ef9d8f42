"""``scripts/bench_kv_tiers.py --part movement`` on CPU at a tiny size: the KV tiers' copies
(device <-> host through ``PoolMover``, host <-> file through ``FileTier``'s NIXL POSIX
requests) against their same-run baselines. No timing is asserted."""

import os
import subprocess
import sys

import pytest

from toolkit.bench import core

from tests.bench import ROOT

PATTERNS = ("scattered", "contiguous")


def run_movement(*flags: str) -> list[dict]:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_kv_tiers.py"), "--part", "movement",
                          "--mib", "1", "--layers", "2", "--repeats", "1", *flags], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "TOOLKIT_LOG": "WARNING"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return core.parse_table(out.stdout)


@pytest.mark.parametrize("flags", [(), ("--fsync", "--cold-reads")], ids=["page-cache", "fsync-cold"])
def test_kv_tiers_movement_times_and_checks_every_path(flags):
    """Guards against the tiers benchmark losing a path or a pattern (device -> host,
    host -> device, host -> file, file -> host; scattered and contiguous) or the same-run
    baseline each is compared with (device copy, host memcpy, plain pwrite / preadv), against
    timing copies whose bytes it did not check (every tier path must read back ``ok``: a
    gather into the wrong host slots, a scatter that missed pages, a NIXL request that
    landed nothing, would read FAIL), and against zero or missing GB/s and ratios. The
    fsync / cold-read variant runs the fsync and page-cache eviction paths too."""
    rows = run_movement(*flags)
    sync = " + fsync" if flags else ""
    read = " (cold: fadvise DONTNEED)" if flags else " (page cache)"
    tiers = [("device -> host (gather, ready, asarray, store)", "device copy (jitted gather)"),
             ("host -> device (slots, scatter, ready)", "device copy (jitted gather)"),
             ("host -> file (FileTier WRITE)" + sync, "plain os.pwrite" + sync),
             ("file -> host (FileTier READ)" + read, "plain os.preadv" + read)]
    baselines = {"device copy (jitted gather)", "host memcpy (np.copyto)", "plain os.pwrite" + sync,
                 "plain os.preadv" + read}
    got = {(r["path"], r["pattern"]): r for r in rows}
    assert {r["path"] for r in rows if r["baseline"] == "(baseline)"} == baselines
    assert set(got) == {(b, "contiguous") for b in baselines} | {(p, pat) for p, _ in tiers for pat in PATTERNS}
    for path, base in tiers:
        for pat in PATTERNS:
            r = got[(path, pat)]
            assert r["baseline"] == base and r["verify"] == "ok", r
    # 1 MiB of 2-layer pages of 64 KiB (K and V): 16 pages, the same bytes on every row
    assert {(r["pages"], r["MiB"]) for r in rows} == {("16", "1.000")}
    assert all(float(r[c]) > 0 for r in rows for c in ("ms", "GB_s", "ratio")), rows
