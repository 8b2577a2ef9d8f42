"""Notebooks run top to bottom without errors.

A notebook's kernel keeps about one core busy (one small model, one request at a time),
so the selected notebooks run side by side, as many at once as there are cores (2 in
CI), each in its own kernel; each test waits for its own notebook and fails with its
error. They run with TOOLKIT_NOTEBOOK_TEST=1: a notebook may skip what only its printed
timings need (prefix_cache.ipynb: the warm-up conversation that keeps compilations out of
its TTFTs)."""

import concurrent.futures
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _execute(path: pathlib.Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute(
        env={**os.environ, "TOOLKIT_NOTEBOOK_TEST": "1"})


@pytest.fixture(scope="module")
def runs(request):
    """The selected notebooks' runs, started together at the first test of this module."""
    paths = [item.callspec.params["path"] for item in request.session.items
             if item.module is request.module and hasattr(item, "callspec") and "path" in item.callspec.params]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1)))
    futures = {p: pool.submit(_execute, p) for p in paths}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, runs):
    """Guards against notebooks rotting as the API moves (every cell must run)."""
    runs[path].result()
