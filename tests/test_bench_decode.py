"""The end-to-end decode benchmark's CPU smoke run (its GPU numbers are in kernels/NOTES.md)."""

import os
import subprocess
import sys


def test_bench_decode_small_runs_both_modes():
    """Guards the bench's own checks (full batch while timed, no request finishing, every page
    back, replays of the recorded step in both engine modes) against engine changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "toolkit.bench_decode", "--small", "--batch", "1", "2",
                          "--steps", "4", "--backends", "reference", "--trace-steps", "2"],
                         cwd=root, env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] == ["reference"]]
    assert [(r[1], r[2]) for r in rows] == [("overlap", "1"), ("overlap", "2"), ("lockstep", "1"), ("lockstep", "2")]
    header = next(line.split() for line in out.stdout.splitlines() if line.split()[:1] == ["backend"])
    col = header.index("new_compiles_while_timed")
    assert all(r[col] == "0" for r in rows), out.stdout
