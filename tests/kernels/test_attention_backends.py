"""kernels.attention: the backends by name, and which prefill kernel the Pallas backend runs."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

from kernels import attention

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNEL_PREFIXES = ("kernels.attention_pallas", "kernels.attention_mgpu", "jax.experimental.pallas",
                   "jax._src.pallas")


def _loaded_after(code: str) -> list[str]:
    """Kernel modules in sys.modules after running code in a fresh interpreter."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith(%r))))" % (
        KERNEL_PREFIXES,)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_interface_loads_kernels_only_when_asked():
    """Guards against importing the interface (the model, config validation) pulling in the
    Pallas kernels, the Triton lowering and Mosaic GPU; asking for the Pallas backend loads them."""
    assert _loaded_after("import kernels.attention as a; a.get_backend('auto'); a.get_backend('reference')") == []
    assert "kernels.attention_pallas" in _loaded_after("import kernels.attention as a; a.get_backend('pallas')")


@pytest.mark.parametrize("module,other", [("kernels.attention_pallas", "kernels.attention_mgpu"),
                                          ("kernels.attention_mgpu", "kernels.attention_pallas")])
def test_triton_and_mosaic_modules_do_not_import_each_other(module, other):
    """Guards against the old import cycle: each kernel module implements one kernel family
    and shares only kernels.tiling; the choice between them is kernels.attention's."""
    loaded = _loaded_after(f"import {module}")
    assert module in loaded and other not in loaded


def test_backends_by_name():
    """auto is the reference off a GPU; each name gives one backend object (equal across
    calls, so a jitted step keyed on it compiles once); the Pallas prefill is the dispatcher."""
    assert attention.get_backend("auto") is attention.REFERENCE
    pallas = attention.get_backend("pallas")
    assert pallas is attention.get_backend("pallas")
    assert pallas.prefill is attention.paged_prefill_attention
    with pytest.raises(ValueError, match="allowed: auto, reference, pallas"):
        attention.get_backend("flash9")


def _spy_prefill(monkeypatch, on_gpu: bool):
    """Replace both prefill kernels by recorders; returns the list of kernels called."""
    from kernels import attention_mgpu, attention_pallas

    calls = []
    monkeypatch.setattr(attention, "_on_gpu", lambda: on_gpu)
    monkeypatch.setattr(attention_mgpu, "paged_prefill_attention", lambda *a, **k: calls.append(("mgpu", k)))
    monkeypatch.setattr(attention_pallas, "paged_prefill_attention", lambda *a, **k: calls.append(("triton", k)))
    return calls


def _call(dtype, D=64, S=16, **kw):
    q = jnp.zeros((8, 2, D), dtype)
    pool = jnp.zeros((1, 4, S, 1, D), dtype)
    attention.paged_prefill_attention(q, pool, pool, 0, jnp.zeros((1, 2), jnp.int32), jnp.asarray([0, 8]),
                                      jnp.asarray([8]), max_q_len=8, scale=0.125, **kw)


@pytest.mark.parametrize("on_gpu,dtype,D,S,want", [
    (True, jnp.bfloat16, 64, 16, "mgpu"), (True, jnp.float16, 128, 32, "mgpu"),
    (True, jnp.float32, 64, 16, "triton"),  # Mosaic GPU kernel: 16-bit only
    (True, jnp.bfloat16, 32, 16, "triton"),  # head dim 64/128 only
    (True, jnp.bfloat16, 64, 4, "triton"),  # pages of a multiple of 8 tokens only
    (False, jnp.bfloat16, 64, 16, "triton"),  # off a GPU: the Triton kernel in interpret mode
])
def test_auto_prefill_picks_the_kernel_that_supports_the_shape(monkeypatch, on_gpu, dtype, D, S, want):
    """Guards against impl=auto sending a dtype or shape to the Mosaic GPU kernel that it
    cannot run (it asserts), or leaving the faster kernel unused on a GPU."""
    calls = _spy_prefill(monkeypatch, on_gpu)
    _call(dtype, D, S)
    assert [c for c, _ in calls] == [want]


def test_prefill_impl_is_forced_and_tiles_reach_only_triton(monkeypatch):
    """impl=mgpu / impl=triton force a kernel (the GPU tests and the benchmark compare them);
    Triton tile arguments reach the Triton kernel; an unknown impl is refused, not ignored."""
    calls = _spy_prefill(monkeypatch, on_gpu=False)
    _call(jnp.bfloat16, impl="mgpu")
    _call(jnp.bfloat16, impl="triton", block_q=64, num_warps=4)
    assert [c for c, _ in calls] == ["mgpu", "triton"]
    assert "block_q" not in calls[0][1] and calls[1][1]["block_q"] == 64 and calls[1][1]["num_warps"] == 4
    with pytest.raises(ValueError, match="impl='cudnn'"):
        _call(jnp.bfloat16, impl="cudnn")
