"""random_checkpoint, the byte tokenizer, and load_checkpoint's dispatch and errors."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.config.schema import ModelConfig
from toolkit.models.loader import load_checkpoint
from toolkit.models.random_init import TINY_ARGS, byte_tokenizer, random_checkpoint
from toolkit.models.spec import ModelArgs, check_weights


def test_shapes_and_values():
    """Guards against shapes that disagree with ModelArgs and degenerate values (all-equal
    norms, near-zero init giving a context-blind model) that would hide bugs in tests."""
    ckpt = random_checkpoint(ModelArgs(**TINY_ARGS))
    check_weights(ckpt.args, ckpt.weights)
    assert all(w.dtype == np.float32 for w in ckpt.weights.values())
    assert ckpt.weights["lm_head"].shape == (64, 384)  # untied: outputs follow the context
    assert 0.9 * 64 ** -0.5 < ckpt.weights["wq"].std() < 1.1 * 64 ** -0.5
    norm = ckpt.weights["attn_norm"]
    assert abs(norm.mean() - 1) < 0.05 and norm.std() > 0.01


def test_seeded():
    """Guards against non-reproducible weights across processes (tests compare runs)."""
    a, b, c = (random_checkpoint(ModelArgs(**TINY_ARGS), seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert not np.array_equal(a.weights["embed"], c.weights["embed"])


def test_untied_has_lm_head():
    """Guards against forgetting lm_head when embeddings are not tied."""
    ckpt = random_checkpoint(ModelArgs(**{**TINY_ARGS, "tie_word_embeddings": False}))
    assert ckpt.weights["lm_head"].shape == (64, 384)


def test_vocab_too_small():
    """Guards against token ids from the byte tokenizer indexing past the embedding."""
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        random_checkpoint(ModelArgs(**{**TINY_ARGS, "vocab_size": 258}))


def test_byte_tokenizer():
    """Guards against a tokenizer that cannot represent arbitrary text, or wrong specials/eos."""
    tok = byte_tokenizer()
    text = "héllo 😀\n\t<|im_start|>x"
    ids = tok.encode(text)
    assert ids[:2] == [ord("h"), 0xC3] and 257 in ids and max(ids) < 259
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.eos_token_ids == [258, 256] and tok.bos_token_id is None
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_loader_random_overrides():
    """Guards against model.random overrides or the seed being ignored."""
    cfg = ModelConfig(name="t", source="random", seed=5, random={"num_layers": 3})
    ckpt = load_checkpoint(cfg, progress=False)
    assert ckpt.args.num_layers == 3 and ckpt.weights["wq"].shape[0] == 3
    np.testing.assert_array_equal(ckpt.weights["embed"], random_checkpoint(ckpt.args, seed=5).weights["embed"])


@pytest.mark.parametrize("cfg, error, match", [
    (ModelConfig(name="t", source="pytorch"), ValueError, "allowed: gguf, hf, orbax, random"),
    (ModelConfig(name="t", source="hf"), ValueError, "model.path"),
    (ModelConfig(name="t", source="orbax", path="/no/such/dir"), FileNotFoundError, "model.path"),
    (ModelConfig(name="t", source="gguf"), ValueError, "model.gguf_package"),
    (ModelConfig(name="t", source="random", random={"layers": 3}), ValueError, "unknown keys"),
])
def test_loader_errors(cfg, error, match):
    """Guards against unhelpful errors for common config mistakes."""
    with pytest.raises(error, match=match):
        load_checkpoint(cfg, progress=False)


def test_device_random_weights_in_the_model_dtype():
    """Guards against model.random_on_device making weights on the host (an 8B shape would
    take minutes and 32 GB), in the wrong dtype, of the wrong shape, degenerate (a near-zero
    init gives a context-blind model), or unseeded."""
    import jax
    import jax.numpy as jnp

    cfg = ModelConfig(name="r", source="random", dtype="bfloat16", random_on_device=True)
    a = load_checkpoint(cfg, dtype=jnp.bfloat16, progress=False)
    b = load_checkpoint(cfg, dtype=jnp.bfloat16, progress=False)
    check_weights(a.args, a.weights)
    assert all(isinstance(w, jax.Array) and w.dtype == jnp.bfloat16 for w in a.weights.values())
    wq = np.asarray(a.weights["wq"], np.float32)
    assert 0.9 * 64 ** -0.5 < wq.std() < 1.1 * 64 ** -0.5
    assert all(np.array_equal(np.asarray(a.weights[k]), np.asarray(b.weights[k])) for k in a.weights)
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        load_checkpoint(ModelConfig(name="r", source="random", random_on_device=True,
                                    random={"vocab_size": 100}), progress=False)
