"""Load a Hugging Face Llama-family model directory (config.json, *.safetensors, tokenizer.json)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from tqdm import tqdm

from toolkit.models.checkpoint import Checkpoint
from toolkit.models.spec import (ATTENTION, MAMBA, ModelArgs, check_weights, missing_layers, put_weight,
                                 stack_index)
from toolkit.models.tokenizer import Tokenizer

# Same block structure and math as Llama (RMSNorm, SwiGLU, rotate_half RoPE).
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Hybrids with Mamba2 layers (toolkit/models/hybrid.py): Bamba (Llama blocks, some layers'
# attention replaced by a Mamba2 mixer, RoPE on half of each head), Mamba2 (mixers only).
HYBRID_MODEL_TYPES = ("bamba", "mamba2")
SUPPORTED_MODEL_TYPES = LLAMA_MODEL_TYPES + HYBRID_MODEL_TYPES

# safetensors dtype names -> numpy; bf16/fp8 come from ml_dtypes since numpy has none
# (safetensors.numpy raises "data type 'bfloat16' not understood" on them).
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# HF per-layer name -> (our key, is a Linear weight to transpose to x @ W)
_LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm", False), "post_attention_layernorm.weight": ("mlp_norm", False),
    "self_attn.q_proj.weight": ("wq", True), "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True), "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False), "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "mlp.gate_proj.weight": ("w_gate", True), "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
_GLOBAL_NAMES = {"embed_tokens.weight": ("embed", False), "norm.weight": ("final_norm", False),
                 "lm_head.weight": ("lm_head", True)}
# the Mamba2 mixer's tensors (under ``mamba.`` in Bamba, ``mixer.`` in Mamba2)
_MIXER_NAMES = {
    "in_proj.weight": ("m_in_proj", True), "in_proj.bias": ("m_in_proj_b", False),
    "conv1d.weight": ("m_conv_w", False), "conv1d.bias": ("m_conv_b", False),
    "dt_bias": ("m_dt_bias", False), "A_log": ("m_A_log", False), "D": ("m_D", False),
    "norm.weight": ("m_norm_w", False), "out_proj.weight": ("m_out_proj", True),
    "out_proj.bias": ("m_out_proj_b", False),
}
_HYBRID_LAYER_NAMES = {
    "bamba": {"input_layernorm.weight": ("attn_norm", False), "pre_ff_layernorm.weight": ("mlp_norm", False),
              "feed_forward.gate_proj.weight": ("w_gate", True), "feed_forward.up_proj.weight": ("w_up", True),
              "feed_forward.down_proj.weight": ("w_down", True),
              **{k: v for k, v in _LAYER_NAMES.items() if k.startswith("self_attn.")},
              **{"mamba." + k: v for k, v in _MIXER_NAMES.items()}},
    "mamba2": {"norm.weight": ("attn_norm", False), **{"mixer." + k: v for k, v in _MIXER_NAMES.items()}},
}
_HYBRID_GLOBAL_NAMES = {
    "bamba": {"model.embed_tokens.weight": ("embed", False), "model.final_layernorm.weight": ("final_norm", False),
              "lm_head.weight": ("lm_head", True)},
    "mamba2": {"backbone.embeddings.weight": ("embed", False), "backbone.norm_f.weight": ("final_norm", False),
               "lm_head.weight": ("lm_head", True)},
}
_HYBRID_PREFIX = {"bamba": "model.", "mamba2": "backbone."}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer some old checkpoints saved


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Zero-copy (memory-mapped) numpy views of every tensor in a .safetensors file.

    Format: u64 little-endian header size, JSON header {name: {dtype, shape,
    data_offsets}}, then the raw little-endian data.
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    if not header:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, h in header.items():
        if h["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported safetensors dtype {h['dtype']}")
        start, end = h["data_offsets"]
        out[name] = data[start:end].view(_DTYPES[h["dtype"]]).reshape(h["shape"])
    return out


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """transformers v4 ``rope_scaling`` or v5 ``rope_parameters``, minus rope_theta; None if plain RoPE."""
    d = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    d.pop("rope_theta", None)
    if "type" in d:  # older spelling
        d.setdefault("rope_type", d.pop("type"))
    return d if d.get("rope_type", "default") != "default" else None


def _hybrid_args(cfg: dict[str, Any]) -> ModelArgs:
    """Bamba / Mamba2 config.json -> ModelArgs with the Mamba2 layers' MambaArgs."""
    from toolkit.models.mamba2 import MambaArgs

    kind, D, L = cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"]
    # transformers writes infinity as {"__float__": "Infinity"}
    limit = tuple(float(x["__float__"] if isinstance(x, dict) else x)
                  for x in (cfg.get("time_step_limit") or (0.0, float("inf"))))
    if kind == "bamba":
        heads = cfg["mamba_n_heads"]
        d_head = cfg.get("mamba_d_head", "auto")
        d_head = cfg.get("mamba_expand", 2) * D // heads if d_head in (None, "auto") else d_head
        m = MambaArgs(num_heads=heads, head_dim=d_head, state_size=cfg["mamba_d_state"],
                      n_groups=cfg.get("mamba_n_groups", 1), conv_kernel=cfg.get("mamba_d_conv", 4),
                      chunk_size=cfg.get("mamba_chunk_size", 256), time_step_limit=limit,
                      norm_eps=float(cfg.get("rms_norm_eps", 1e-5)))
        attn = set(cfg.get("attn_layer_indices") or ())
        types = tuple(ATTENTION if i in attn else MAMBA for i in range(L))
        ah = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        return ModelArgs(
            vocab_size=cfg["vocab_size"], hidden_size=D, intermediate_size=cfg["intermediate_size"],
            num_layers=L, num_heads=ah, num_kv_heads=cfg.get("num_key_value_heads") or ah,
            head_dim=cfg.get("head_dim") or D // ah,
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(cfg), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            architecture="bamba", layer_types=types, mamba=m.to_dict(),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", 0.5)))
    m = MambaArgs(num_heads=cfg["num_heads"], head_dim=cfg["head_dim"], state_size=cfg["state_size"],
                  n_groups=cfg.get("n_groups", 1), conv_kernel=cfg.get("conv_kernel", 4),
                  chunk_size=cfg.get("chunk_size", 256), time_step_limit=limit,
                  norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)))
    if m.intermediate_size != int(cfg.get("expand", 2) * D):
        raise ValueError(f"config.json: num_heads * head_dim = {m.intermediate_size} is not expand * hidden_size")
    # No attention layers: a nominal one-head shape for the (empty: L = 0) KV pool.
    return ModelArgs(
        vocab_size=cfg["vocab_size"], hidden_size=D, intermediate_size=0, num_layers=L, num_heads=1,
        num_kv_heads=1, head_dim=8, rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 1 << 20),
        architecture="mamba2", layer_types=(MAMBA,) * L, mamba=m.to_dict(), has_mlp=False)


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json model_type {cfg.get('model_type')!r} is not supported "
                         f"(supported: {list(SUPPORTED_MODEL_TYPES)})")
    if cfg["model_type"] in HYBRID_MODEL_TYPES:
        return _hybrid_args(cfg)
    heads = cfg["num_attention_heads"]
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelArgs(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=float(theta),
        rope_scaling=_rope_scaling(cfg),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
    )


def _place_hybrid(name: str, args: ModelArgs) -> tuple[str, tuple[int, int] | None, bool] | None:
    """(our key, (row, rows) of its stacked array or None, transpose?) of a hybrid's tensor."""
    glob = _HYBRID_GLOBAL_NAMES[args.architecture]
    if name in glob:
        key, transpose = glob[name]
        return None if key == "lm_head" and args.tie_word_embeddings else (key, None, transpose)
    match = _LAYER.fullmatch(name.removeprefix(_HYBRID_PREFIX[args.architecture]))
    names = _HYBRID_LAYER_NAMES[args.architecture]
    if match and match.group(2) in names and int(match.group(1)) < args.num_layers:
        key, transpose = names[match.group(2)]
        row = stack_index(args, key, int(match.group(1)))
        if row is None:
            raise ValueError(f"safetensors tensor {name!r}: layer {match.group(1)} is "
                             f"{args.types[int(match.group(1))]}, not the layer type config.json says")
        return key, row, transpose
    raise ValueError(f"safetensors tensor {name!r} is not part of a supported {args.architecture} model")


def _place(name: str, args: ModelArgs) -> tuple[str, int | None, bool] | None:
    """(our key, layer index or None, transpose?) for an HF tensor name; None = skip it."""
    short = name.removeprefix("model.")
    if short in _GLOBAL_NAMES:
        key, transpose = _GLOBAL_NAMES[short]
        # Tied checkpoints sometimes still store lm_head; the embedding is authoritative.
        return None if key == "lm_head" and args.tie_word_embeddings else (key, None, transpose)
    match = _LAYER.fullmatch(short)
    if match and match.group(2) in _LAYER_NAMES and int(match.group(1)) < args.num_layers:
        key, transpose = _LAYER_NAMES[match.group(2)]
        return key, int(match.group(1)), transpose
    if _IGNORED.fullmatch(name):
        return None
    raise ValueError(f"safetensors tensor {name!r} is not part of a supported Llama-family model")


def load_hf_dir(path: str | Path, dtype=np.float32, progress: bool = True) -> Checkpoint:
    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json; is it a Hugging Face model directory?")
    cfg = json.loads((d / "config.json").read_text())
    args = args_from_config(cfg)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d} has no *.safetensors files (.bin checkpoints are not supported)")
    dtype = np.dtype(dtype)
    weights: dict[str, np.ndarray] = {}
    filled: dict[str, int] = {}
    tensors = {name: t for f in files for name, t in read_safetensors(f).items()}
    rows: dict[str, int] = {}  # stacked key -> its rows (a hybrid stacks keys per layer type)
    for name, t in tqdm(tensors.items(), desc="loading safetensors", unit="tensor", file=sys.stderr,
                        disable=not progress):
        if args.is_hybrid:
            if (place := _place_hybrid(name, args)) is None:
                continue
            key, at, transpose = place
            if key == "m_conv_w":  # HF Conv1d [C, 1, K] -> [C, K]
                t = t[:, 0, :]
            layer = None if at is None else at[0]
            if at is not None:
                rows[key] = at[1]
            n = at[1] if at is not None else args.num_layers
        else:
            if (place := _place(name, args)) is None:
                continue
            key, layer, transpose = place
            n = rows[key] = args.num_layers
            if layer is None:
                del rows[key]
        put_weight(weights, filled, n, key, layer, t.T if transpose else t, dtype)
    if short := missing_layers(filled, rows):
        raise ValueError(f"{d}: some of the {args.num_layers} layers lack tensors for {short}")
    if cfg.get("attention_bias") and not {"bq", "bk", "bv"} <= weights.keys():
        raise ValueError(f"{d}: config says attention_bias but q/k/v biases are missing")
    check_weights(args, weights)
    return Checkpoint(args=args, weights=weights, tokenizer=Tokenizer.from_hf_dir(d))
