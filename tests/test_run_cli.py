"""The main job as a script: stdout carries only the generated text, in every mode."""

import os
import subprocess
import sys

import pytest

from tests.conftest import engine_cfg
from toolkit.engine.request import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["model=tiny-random", "chat=false", "prompt=Hello there", "max_new_tokens=12", "temperature=0",
        "engine.num_pages=64", "engine.chunk_size=32", "engine.attention_backend=reference"]


def run(*extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "toolkit.run", *ARGS, *extra], cwd=ROOT, env=env,
                       capture_output=True, timeout=300)
    # bytes, not text mode: a random model's output may hold "\r", which text mode rewrites
    p.stderr = p.stderr.decode(errors="replace")
    return p


@pytest.fixture(scope="module")
def expected(tiny_ckpt):
    from toolkit.engine.engine import Engine

    e = Engine(tiny_ckpt, engine_cfg(num_pages=64, chunk_size=32))
    return e.generate(["Hello there"], SamplingParams(max_new_tokens=12))[0].text + "\n"


@pytest.mark.parametrize("mode", [[], ["disagg=true", "transfer=inproc"], ["disagg=true", "transfer=nixl"]],
                         ids=["unified", "disagg-inproc", "disagg-nixl"])
def test_stdout_is_only_the_text(expected, mode):
    """Guards against logs, progress bars or library chatter (NIXL logs to stdout by default)
    polluting the scriptable output, and against P/D changing the answer."""
    p = run(*mode)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout == expected.encode()
    assert "[stats]" in p.stderr


def test_bad_option_exits_2_with_message():
    """Guards against a bad option producing a traceback instead of a one-line reason."""
    p = run("engine.page_size=12")
    assert p.returncode == 2
    assert "engine.page_size=12 must be a power of two" in p.stderr
    assert p.stdout == b""
