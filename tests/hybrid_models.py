"""Tiny random-weight hybrid models (Bamba: attention + Mamba2 layers; Mamba2: mixers only)
built with transformers itself and saved as Hugging Face directories, for the tests that
compare our hybrid forward, engine and P/D paths against transformers' PyTorch code.

transformers initialises a mixer with A = -(1..H), D = 1, dt_bias = 1 and linear weights of
std 0.02: every token then gets nearly the same logits and greedy decoding is decided by
near ties. ``randomize`` draws every parameter at a scale where logits differ clearly (the
tests still check a top-2 margin before comparing tokens).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers' hub kernels: never on the network

VOCAB = 384  # the byte tokenizer's (toolkit.models.random_init.byte_tokenizer)
CHUNK = 16  # the SSD scan's chunk: prompts in the tests cross several


def bamba_config(**kw):
    import transformers

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
                mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
                mamba_chunk_size=CHUNK, max_position_embeddings=2048, rms_norm_eps=1e-5,
                tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=258)
    base.update(kw)
    return transformers.BambaConfig(**base)


def mamba2_config(**kw):
    import transformers

    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_heads=4, head_dim=32,
                expand=2, state_size=8, n_groups=2, conv_kernel=4, chunk_size=CHUNK,
                layer_norm_epsilon=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                eos_token_id=258)
    base.update(kw)
    return transformers.Mamba2Config(**base)


def randomize(model, seed: int = 0) -> None:
    """Every parameter drawn anew (float32): norms near 1, A in -[1, 8], dt_bias so that
    softplus(dt) is ~0.05-0.7, weights of std 1/sqrt(fan_in) (so activations keep their scale)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(1 + 7 * torch.rand(p.shape, generator=g)))
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.5 - 3.0)
            elif name.endswith(".D"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # norms and biases
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                        else 0.1 * torch.randn(p.shape, generator=g))
            elif "conv1d" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def build(kind: str, seed: int = 0, **kw):
    """A float32 transformers model ("bamba" or "mamba2") with random weights, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "bamba":
        model = transformers.BambaForCausalLM(bamba_config(**kw))
    elif kind == "mamba2":
        model = transformers.Mamba2ForCausalLM(mamba2_config(**kw))
    else:
        raise ValueError(kind)
    randomize(model, seed)
    return model.float().eval()


def save(model, path: Path) -> Path:
    """The model plus our byte tokenizer as an HF directory (what ``model=hf`` loads)."""
    from toolkit.models.random_init import CHATML_TEMPLATE, byte_tokenizer

    path = Path(path)
    model.save_pretrained(path)
    byte_tokenizer().tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                           "chat_template": CHATML_TEMPLATE}))
    return path


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy continuation (its own cache: chunked scan for the prompt, then
    the recurrent step per token) and the smallest top-2 logit margin along it."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, eos_token_id=None,
                             pad_token_id=0)
    margins = [float(torch.topk(s[0], 2).values[0] - torch.topk(s[0], 2).values[1]) for s in out.scores]
    return out.sequences[0, len(prompt):].tolist(), min(margins)
