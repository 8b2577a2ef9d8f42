"""CPU smoke runs of every benchmark (``toolkit.bench.*``), each as its command line."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_bench(module: str, *overrides: str, timeout: float = 300) -> str:
    """``python -m toolkit.bench.<module> <overrides>`` on CPU; its stdout (fails on a non-zero exit)."""
    out = subprocess.run([sys.executable, "-m", f"toolkit.bench.{module}", *overrides], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "TOOLKIT_LOG": "WARNING"},
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
