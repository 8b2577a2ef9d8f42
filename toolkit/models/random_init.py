"""Random weights and a byte-level tokenizer, for tests and benchmarks without a download."""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from toolkit.models.checkpoint import Checkpoint
from toolkit.models.spec import ATTENTION, MAMBA, ModelArgs, check_weights
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


def hybrid_args(overrides: dict[str, Any]) -> dict[str, Any]:
    """``model.random`` of a hybrid -> ModelArgs fields: ``attn_layer_indices`` (Bamba's
    config key) becomes ``layer_types``; a mamba2 model has only Mamba2 layers and no MLP."""
    o = dict(overrides)
    arch = o.get("architecture", "llama")
    if arch == "llama":
        return o
    L = o.get("num_layers", TINY_ARGS["num_layers"])
    attn = set(o.pop("attn_layer_indices", ()) or ())
    if arch == "mamba2":
        o.setdefault("has_mlp", False)
        o.setdefault("intermediate_size", 0)
        attn = set()
    o.setdefault("layer_types", [ATTENTION if i in attn else MAMBA for i in range(L)])
    o.setdefault("mamba", dict(num_heads=4, head_dim=32, state_size=8, n_groups=2, conv_kernel=4, chunk_size=16))
    if arch == "bamba":
        o.setdefault("partial_rotary_factor", 0.5)
    return o


def _hybrid_weights(args: ModelArgs, normal, norm, fill) -> dict:
    """The per-kind stacked weights of a hybrid (spec.py), from the callers' samplers:
    normal(*shape) (std 1/sqrt(fan_in)), norm(*shape) (near 1), fill(kind, *shape) for the
    state-space parameters (kind: A_log, dt_bias, D)."""
    from toolkit.models.mamba2 import MambaArgs

    L, D, F = args.num_layers, args.hidden_size, args.intermediate_size
    La, Lm = args.num_attn_layers, args.num_mamba_layers
    qd, kd = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    w = {"attn_norm": norm(L, D)}
    if La:
        w |= {"wq": normal(La, D, qd), "wk": normal(La, D, kd), "wv": normal(La, D, kd), "wo": normal(La, qd, D)}
    if args.has_mlp:
        w |= {"mlp_norm": norm(L, D), "w_gate": normal(L, D, F), "w_up": normal(L, D, F), "w_down": normal(L, F, D)}
    m = MambaArgs.from_dict(args.mamba)
    H, I, C, K = m.num_heads, m.intermediate_size, m.conv_dim, m.conv_kernel
    w |= {"m_in_proj": normal(Lm, D, I + C + H), "m_conv_w": normal(Lm, K, C).swapaxes(-1, -2), "m_conv_b": fill("bias", Lm, C),
          "m_dt_bias": fill("dt_bias", Lm, H), "m_A_log": fill("A_log", Lm, H), "m_D": fill("D", Lm, H),
          "m_norm_w": norm(Lm, I), "m_out_proj": normal(Lm, I, D)}
    return w


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
    if args.is_hybrid:
        # A in -[1, 8], softplus(dt) ~0.05-0.7, D ~N(0, 1): state that matters, decays that differ
        fill = lambda kind, *shape: {  # noqa: E731
            "A_log": lambda: np.log(1 + 7 * rng.random(shape)), "dt_bias": lambda: rng.random(shape) * 2.5 - 3.0,
            "D": lambda: rng.normal(0.0, 1.0, shape), "bias": lambda: rng.normal(0.0, 0.1, shape)}[kind]().astype(np.float32)
        weights = {"embed": rng.normal(0.0, 1.0, (V, D)).astype(np.float32), "final_norm": norm(D),
                   **_hybrid_weights(args, normal, norm, fill)}
    else:
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
    if args.is_hybrid:
        def fill(kind, *shape):
            u = jax.random.uniform(next(key), shape, jnp.float32)
            v = {"A_log": jnp.log(1 + 7 * u), "dt_bias": u * 2.5 - 3.0, "D": u * 2 - 1, "bias": (u - 0.5) * 0.2}[kind]
            return v if kind in ("A_log", "dt_bias", "D") else v.astype(dtype)  # (the SSM's stay float32)

        w = {"embed": normal(V, D, std=1.0), "final_norm": ones(D), **_hybrid_weights(args, normal, ones, fill)}
        if not args.tie_word_embeddings:
            w["lm_head"] = normal(D, V)
        check_weights(args, w)
        return Checkpoint(args=args, weights=w, tokenizer=byte_tokenizer())
    w = {"embed": normal(V, D, std=1.0), "final_norm": ones(D), "attn_norm": ones(L, D),
         "wq": normal(L, D, qd), "wk": normal(L, D, kd), "wv": normal(L, D, kd), "wo": normal(L, qd, D),
         "mlp_norm": ones(L, D), "w_gate": normal(L, D, F), "w_up": normal(L, D, F), "w_down": normal(L, F, D)}
    if not args.tie_word_embeddings:
        w["lm_head"] = normal(D, V)
    check_weights(args, w)
    return Checkpoint(args=args, weights=w, tokenizer=byte_tokenizer())
