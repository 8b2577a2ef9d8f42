"""``python -m toolkit.bench.transfer`` on CPU: two processes, DRAM pools, real NIXL agents."""

from toolkit.bench import core

from tests.bench import run_bench


def test_transfer_cpu_writes_and_verifies_every_pattern():
    """Guards against the transfer bench timing writes it did not verify (CRC of every page
    on both sides), losing a pattern or its same-run ceiling, and against the page-major
    pool costing more than two descriptors per page (K, V: every layer in one piece) or
    contiguous runs not merging into one descriptor per buffer. The staged pattern's
    gather, write and scatter must land the same bytes as a direct write."""
    rows = core.parse_table(run_bench("transfer", "bench.platform=cpu", "bench.mib=1", "bench.layers=2",
                                      "bench.repeats=2", "bench.startup_timeout_s=120", "bench.rooms=4",
                                      "bench.patterns=[random,contig,rooms,staged]", timeout=240))
    assert [r["variant"] for r in rows] == ["nixl WRITE random", "nixl WRITE contig", "nixl WRITE rooms x4",
                                            "nixl WRITE staged (gather, write, scatter)",
                                            "numpy copy (same bytes)", "numpy take (same pages)"]
    assert [r["verify"] for r in rows[:4]] == ["ok"] * 4
    # 8 pages of 2 layers: 2 buffers x 8 pages; contiguous runs merge to one per buffer
    assert [r["descs_runs"] for r in rows[:4]] == ["16/16", "16/2", "16/16", "16/2"]
    assert all(float(r["GB_s"]) > 0 for r in rows)
