"""Random weights and a byte-level tokenizer, for tests and benchmarks without a download."""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from toolkit.models.checkpoint import Checkpoint
from toolkit.models.spec import ModelArgs, check_weights
from toolkit.models.tokenizer import BYTE_ALPHABET, Tokenizer

TINY_ARGS: dict[str, Any] = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> Tokenizer:
    """Ids 0-255 are the bytes (in GPT-2's byte alphabet), 256-258 the ChatML specials."""
    vocab = {BYTE_ALPHABET[b]: b for b in range(256)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    return Tokenizer(tok, chat_template=CHATML_TEMPLATE, bos_token_id=None,
                     eos_token_ids=[ids[2], ids[0]], add_bos_token=False)


def _check_vocab(args: ModelArgs) -> None:
    n_tokens = 256 + len(SPECIAL_TOKENS)
    if args.vocab_size < n_tokens:
        raise ValueError(f"random model needs vocab_size >= {n_tokens} (byte tokenizer), got {args.vocab_size}")


def random_checkpoint(args: ModelArgs, seed: int = 0) -> Checkpoint:
    _check_vocab(args)
    rng = np.random.default_rng(seed)
    L, D, F, V = args.num_layers, args.hidden_size, args.intermediate_size, args.vocab_size
    qd, kd = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    # Scaled like a trained model (std 1/sqrt(fan_in), unit embeddings) so attention is
    # sharp and the next token depends on the context: a near-uniform model would emit the
    # same token forever and hide KV-cache bugs from the tests that compare outputs.
    normal = lambda *shape: rng.normal(0.0, shape[-2] ** -0.5, shape).astype(np.float32)  # noqa: E731
    # Norm weights near 1 with noise: exactly-1 norms would hide a missing or misplaced norm.
    norm = lambda *shape: (1.0 + rng.normal(0.0, 0.1, shape)).astype(np.float32)  # noqa: E731
    weights = {
        "embed": rng.normal(0.0, 1.0, (V, D)).astype(np.float32), "final_norm": norm(D),
        "attn_norm": norm(L, D), "wq": normal(L, D, qd), "wk": normal(L, D, kd), "wv": normal(L, D, kd),
        "wo": normal(L, qd, D), "mlp_norm": norm(L, D),
        "w_gate": normal(L, D, F), "w_up": normal(L, D, F), "w_down": normal(L, F, D),
    }
    if not args.tie_word_embeddings:
        weights["lm_head"] = normal(D, V)
    check_weights(args, weights)
    return Checkpoint(args=args, weights=weights, tokenizer=byte_tokenizer())


def device_random_checkpoint(args: ModelArgs, dtype, seed: int = 0) -> Checkpoint:
    """Random weights made directly on the device in ``dtype`` (an 8B model in seconds where
    the host path takes minutes), scaled like a trained model (std 1/sqrt(fan_in)), norms
    exactly 1. Other numbers than ``random_checkpoint`` with the same seed: for benchmarks
    (``model.random_on_device=true``), not for comparisons with the HF oracle."""
    import jax
    import jax.numpy as jnp

    _check_vocab(args)
    key = iter(jax.random.split(jax.random.key(seed), 16))
    L, D, F, V = args.num_layers, args.hidden_size, args.intermediate_size, args.vocab_size
    qd, kd = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim

    def normal(*shape, std=None):
        std = shape[-2] ** -0.5 if std is None else std
        return (jax.random.normal(next(key), shape, dtype) * jnp.asarray(std, dtype)).astype(dtype)

    ones = lambda *shape: jnp.ones(shape, dtype)  # noqa: E731
    w = {"embed": normal(V, D, std=1.0), "final_norm": ones(D), "attn_norm": ones(L, D),
         "wq": normal(L, D, qd), "wk": normal(L, D, kd), "wv": normal(L, D, kd), "wo": normal(L, qd, D),
         "mlp_norm": ones(L, D), "w_gate": normal(L, D, F), "w_up": normal(L, D, F), "w_down": normal(L, F, D)}
    if not args.tie_word_embeddings:
        w["lm_head"] = normal(D, V)
    check_weights(args, w)
    return Checkpoint(args=args, weights=w, tokenizer=byte_tokenizer())
