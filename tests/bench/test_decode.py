"""The end-to-end decode benchmark's CPU smoke run (its GPU numbers are in kernels/NOTES.md)."""

from toolkit.bench import core

from tests.bench import run_bench


def test_bench_decode_small_runs_both_modes():
    """Guards the bench's own checks (full batch while timed, no request finishing, every page
    back, replays of the recorded step in both engine modes) against engine changes."""
    out = run_bench("decode", "bench.quick=true", "bench.batch_sizes=[1,2]", "bench.steps=4",
                    "bench.backends=[reference]", "bench.trace_steps=2")
    rows = [r for r in core.parse_table(out) if r["backend"] == "reference"]
    assert [(r["mode"], r["batch"]) for r in rows] == [("overlap", "1"), ("overlap", "2"), ("lockstep", "1"),
                                                       ("lockstep", "2")]
    assert all(r["new_compiles_while_timed"] == "0" for r in rows), out
    assert all(float(r["device_ms"]) > 0 and float(r["roofline_ms"]) > 0 for r in rows), out
