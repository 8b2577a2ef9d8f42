"""The engine's boundary: drivers (P/D roles, servers, benchmarks, notebooks, scripts) use its
public methods, never its parts."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
# An attribute access of one of the engine's parts (``engine.allocator``, ``eng.runner.pool``,
# ``w.engine.seqs``...); ``toolkit.cache.allocator`` the module is not one.
PARTS = re.compile(r"(?<!\bcache)\.(allocator|scheduler|runner|seqs)\b")
INSIDE = ("toolkit/engine/", "tests/engine/")  # the engine and its own white-box tests


def test_no_driver_reads_the_engines_parts():
    """Guards against callers reaching into the engine again (``engine.allocator``,
    ``engine.scheduler.running``, ``engine.runner.pool``, ``engine.seqs.pop``): then every
    change inside the engine must also edit disagg/, serve/ and the benchmarks."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    hits = []
    for f in files:
        if not f.endswith((".py", ".ipynb")) or f.startswith(INSIDE) or f == "tests/test_engine_boundary.py":
            continue
        for n, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1):
            if PARTS.search(line):
                hits.append(f"{f}:{n}: {line.strip()}")
    assert not hits, "reads the engine's internals:\n" + "\n".join(hits)
