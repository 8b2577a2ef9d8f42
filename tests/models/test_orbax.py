"""save_orbax / load_orbax round trips, and the convert CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from toolkit.models.orbax_io import load_orbax, save_orbax
from toolkit.models.random_init import TINY_ARGS, random_checkpoint
from toolkit.models.spec import ModelArgs


def assert_same(a, b):
    assert a.args == b.args
    assert a.weights.keys() == b.weights.keys()
    for name, w in a.weights.items():
        assert b.weights[name].dtype == w.dtype, name
        np.testing.assert_array_equal(b.weights[name], w, err_msg=name)
    ta, tb = a.tokenizer, b.tokenizer
    assert (ta.chat_template, ta.bos_token_id, ta.eos_token_ids, ta.add_bos_token) == (
        tb.chat_template, tb.bos_token_id, tb.eos_token_ids, tb.add_bos_token)
    text = "<|im_start|>user\nnaïve 😀 123<|im_end|>"
    assert ta.encode(text) == tb.encode(text)


def test_round_trip_random(tmp_path):
    """Guards against losing weights, args (rope_scaling dict, untied head) or tokenizer metadata."""
    args = ModelArgs(**{**TINY_ARGS, "tie_word_embeddings": False,
                        "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    ckpt = random_checkpoint(args, seed=1)
    save_orbax(ckpt, tmp_path / "ck")
    assert_same(ckpt, load_orbax(tmp_path / "ck"))


def test_round_trip_bf16_and_cast(tmp_path):
    """Guards against bf16 weights being upcast on save, and against ignoring ``dtype`` on load."""
    ckpt = random_checkpoint(ModelArgs(**TINY_ARGS))
    ckpt.weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in ckpt.weights.items()}
    save_orbax(ckpt, tmp_path / "ck")
    assert_same(ckpt, load_orbax(tmp_path / "ck"))
    as_f32 = load_orbax(tmp_path / "ck", dtype=np.float32)
    assert as_f32.weights["wq"].dtype == np.float32


def test_round_trip_gguf(gguf_ckpt, tmp_path):
    """Guards the real model's round trip, and that Orbax loads faster than the GGUF."""
    save_orbax(gguf_ckpt, tmp_path / "smol")
    start = time.perf_counter()
    back = load_orbax(tmp_path / "smol")
    print(f"orbax load of SmolLM2-135M: {time.perf_counter() - start:.2f}s")
    assert_same(gguf_ckpt, back)


def test_not_a_checkpoint(tmp_path):
    """Guards against a confusing orbax error when model.path points elsewhere."""
    with pytest.raises(FileNotFoundError, match="toolkit.convert"):
        load_orbax(tmp_path)


def test_convert_cli(tmp_path):
    """Guards the `python -m toolkit.convert` entry point (Hydra wiring, output, timing lines)."""
    out = tmp_path / "tiny"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "toolkit.convert", "model=tiny-random", f"output={out}"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "load from random:" in proc.stderr and "load from orbax:" in proc.stderr
    ckpt = load_orbax(out)
    assert ckpt.args == ModelArgs(**TINY_ARGS)
