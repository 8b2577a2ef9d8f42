"""load_hf_dir against load_gguf on the same model, and on tiny models transformers writes."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from toolkit.models.hf_loader import args_from_config, load_hf_dir
from toolkit.models.random_init import CHATML_TEMPLATE, byte_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=None,
            eos_token_id=258, pad_token_id=None)


def save_tiny(path, model) -> None:
    """A transformers model plus our byte tokenizer, as an HF directory."""
    model.save_pretrained(path)
    byte_tokenizer().tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                            "chat_template": CHATML_TEMPLATE}))


def test_matches_gguf(hf_dir, gguf_ckpt):
    """Guards against the two loaders disagreeing on the same model: transposes, tying,
    config fields (rope_parameters, head_dim), tokenizer and chat template."""
    got = load_hf_dir(hf_dir, progress=False)
    assert got.args == gguf_ckpt.args
    assert got.weights.keys() == gguf_ckpt.weights.keys()
    for name, w in gguf_ckpt.weights.items():
        np.testing.assert_array_equal(got.weights[name], w, err_msg=name)
    tok, ref = got.tokenizer, gguf_ckpt.tokenizer
    for text in ["Hello  world 123", "<|im_start|>user\nnaïve 😀<|im_end|>", "def f():\n\treturn 1"]:
        assert tok.encode(text) == ref.encode(text)
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token) == (1, [2], False)


def test_bf16_untied(tmp_path):
    """Guards against bf16 safetensors failing to load or being bit-cast wrongly (numpy has
    no bfloat16), and against dropping an untied lm_head."""
    cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    save_tiny(tmp_path, model)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    got = load_hf_dir(tmp_path, progress=False)
    assert not got.args.tie_word_embeddings and got.args.head_dim == 8
    np.testing.assert_array_equal(got.weights["lm_head"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(got.weights["wk"][1], sd["model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(got.weights["embed"], sd["model.embed_tokens.weight"])
    as_bf16 = load_hf_dir(tmp_path, dtype=ml_dtypes.bfloat16, progress=False)
    assert as_bf16.weights["wq"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(as_bf16.weights["wq"].astype(np.float32), got.weights["wq"])
    assert got.tokenizer.eos_token_ids == [258]


def test_qwen2_biases(tmp_path):
    """Guards against dropping q/k/v biases (Qwen2-style attention bias)."""
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True))
    save_tiny(tmp_path, model)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    got = load_hf_dir(tmp_path, progress=False)
    for ours, theirs in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):
        np.testing.assert_array_equal(got.weights[ours][0], sd[f"model.layers.0.self_attn.{theirs}.bias"])


def test_unsupported_tensor(tmp_path):
    """Guards against silently ignoring weights our model has no place for (o_proj bias)."""
    save_tiny(tmp_path, transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attention_bias=True)))
    with pytest.raises(ValueError, match="o_proj.bias"):
        load_hf_dir(tmp_path, progress=False)


BASE = dict(model_type="llama", vocab_size=10, hidden_size=64, intermediate_size=8,
            num_hidden_layers=1, num_attention_heads=4)


@pytest.mark.parametrize("extra, theta, scaling", [
    ({}, 10000.0, None),
    ({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}, 5e5,
     {"rope_type": "linear", "factor": 2.0}),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, 1e6, None),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, 5e5,
     {"rope_type": "llama3", "factor": 8.0}),
])
def test_config_rope_variants(extra, theta, scaling):
    """Guards against misreading rope settings across transformers v4 (rope_theta/rope_scaling)
    and v5 (rope_parameters) configs."""
    args = args_from_config({**BASE, **extra})
    assert (args.rope_theta, args.rope_scaling) == (theta, scaling)
    assert (args.head_dim, args.num_kv_heads, args.tie_word_embeddings) == (16, 4, False)


def test_unsupported_model_type():
    """Guards against loading e.g. Gemma (same tensor names, different math) as Llama."""
    with pytest.raises(ValueError, match="'gemma' is not supported"):
        args_from_config({**BASE, "model_type": "gemma"})
