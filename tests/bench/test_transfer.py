"""``python -m toolkit.bench.transfer`` on CPU: two processes, DRAM pools, real NIXL agents."""

from toolkit.bench import core

from tests.bench import run_bench


def test_transfer_cpu_writes_and_verifies_both_patterns():
    """Guards against the transfer bench timing writes it did not verify (CRC of every page
    row on both sides), losing a pattern or its same-run ceiling."""
    rows = core.parse_table(run_bench("transfer", "bench.platform=cpu", "bench.mib=1", "bench.layers=2",
                                      "bench.repeats=2", "bench.startup_timeout_s=120", timeout=240))
    assert [r["variant"] for r in rows] == ["nixl WRITE random", "nixl WRITE contig", "numpy copy (same bytes)",
                                            "numpy take (same pages)"]
    assert [r["verify"] for r in rows[:2]] == ["ok", "ok"]
    assert rows[0]["descs_runs"] == "32/32" and rows[1]["descs_runs"] == "32/4"  # 2 x L x n descriptors; merged runs
    assert all(float(r["GB_s"]) > 0 for r in rows)
