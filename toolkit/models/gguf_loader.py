"""Load a llama.cpp GGUF file into our layout (see spec.py).

Every tensor is dequantized to float32 with ``gguf.quants.dequantize`` and then
cast to ``dtype``. GGUF stores a linear layer as numpy ``[out, in]`` (ggml's
``ne`` order is reversed), so matrices are transposed to our ``x @ W`` layout.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from toolkit.models.checkpoint import Checkpoint
from toolkit.models.spec import ModelArgs, check_weights, missing_layers, put_weight
from toolkit.models.tokenizer import Tokenizer

# arch -> whether llama.cpp's converter permuted Q/K rows for its interleaved
# ("GPT-J") RoPE. qwen2 uses NEOX RoPE in llama.cpp, so its rows are left alone.
SUPPORTED_ARCHS = {"llama": True, "qwen2": False}

# GGUF per-layer name -> (our key, is a matrix to transpose)
_LAYER_NAMES = {
    "attn_norm.weight": ("attn_norm", False), "ffn_norm.weight": ("mlp_norm", False),
    "attn_q.weight": ("wq", True), "attn_k.weight": ("wk", True), "attn_v.weight": ("wv", True),
    "attn_output.weight": ("wo", True),
    "ffn_gate.weight": ("w_gate", True), "ffn_up.weight": ("w_up", True), "ffn_down.weight": ("w_down", True),
    "attn_q.bias": ("bq", False), "attn_k.bias": ("bk", False), "attn_v.bias": ("bv", False),
}
_GLOBAL_NAMES = {"token_embd.weight": ("embed", False), "output_norm.weight": ("final_norm", False),
                 "output.weight": ("lm_head", True)}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def _meta(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


def reverse_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (numpy ``[n_heads*Dh, ...]``).

    llama.cpp interleaves each head's rows as (x0, x_half, x1, x_half+1, ...) for
    its pairwise RoPE; HF's rotate_half wants the two halves contiguous.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t: gguf.ReaderTensor) -> np.ndarray:
    try:
        return gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"GGUF tensor {t.name!r} has type {t.tensor_type.name}, "
                         "which gguf.quants cannot dequantize") from None


def _rope_scaling(reader: gguf.GGUFReader, arch: str, rope_freqs: np.ndarray | None,
                  head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = _meta(reader, f"{arch}.rope.scaling.type")
    factor = _meta(reader, f"{arch}.rope.scaling.factor") or _meta(reader, f"{arch}.rope.scale_linear")
    orig = _meta(reader, f"{arch}.rope.scaling.original_context_length")
    if rope_freqs is not None:
        return _llama3_scaling(rope_freqs, head_dim, theta, orig or 8192)
    if kind in (None, "none") and not factor:
        return None
    kind = kind or "linear"
    if kind not in ("linear", "yarn") or not factor:
        raise ValueError(f"GGUF rope scaling type {kind!r} with factor {factor} is not supported "
                         "(linear or yarn with a factor)")
    out: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn" and orig:
        out["original_max_position_embeddings"] = int(orig)
        for k in ("beta_fast", "beta_slow"):
            if (v := _meta(reader, f"{arch}.rope.scaling.yarn_{k}")) is not None:
                out[k] = float(v)
    return out


def _llama3_scaling(freqs: np.ndarray, head_dim: int, theta: float, orig: int) -> dict[str, Any]:
    """Recover HF's llama3 rope_scaling from llama.cpp's precomputed ``rope_freqs`` tensor.

    rope_freqs[i] = (original inv_freq) / (scaled inv_freq). We assume the usual
    low/high_freq_factor = 1/4 and check the tensor against them.
    """
    factor, low, high = float(freqs.max()), 1.0, 4.0
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    expect = 1.0 / ((1 - smooth) / factor + smooth)
    if freqs.shape != expect.shape or not np.allclose(freqs, expect, rtol=1e-3):
        raise ValueError("GGUF rope_freqs tensor does not match llama3 rope scaling with "
                         f"low/high_freq_factor 1/4 and original context {orig}; not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": orig}


def _model_args(reader: gguf.GGUFReader, arch: str, shapes: dict[str, tuple[int, ...]],
                rope_freqs: np.ndarray | None) -> ModelArgs:
    m = lambda key, default=None: _meta(reader, f"{arch}.{key}", default)  # noqa: E731
    hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
    head_dim = int(m("attention.key_length") or m("rope.dimension_count") or hidden // heads)
    theta = float(m("rope.freq_base", 10000.0))
    return ModelArgs(
        # Rows of the embedding, which is what the forward pass needs (== token count here).
        vocab_size=int(m("vocab_size") or shapes["token_embd.weight"][0]),
        hidden_size=hidden,
        intermediate_size=int(m("feed_forward_length")),
        num_layers=int(m("block_count")),
        num_heads=heads,
        num_kv_heads=int(m("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, rope_freqs, head_dim, theta),
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in shapes,
        max_position_embeddings=int(m("context_length", 2048)),
    )


def _place(name: str, args: ModelArgs) -> tuple[str, int | None, bool]:
    """(our key, layer index or None, transpose?) for a GGUF tensor name."""
    if name in _GLOBAL_NAMES:
        key, transpose = _GLOBAL_NAMES[name]
        return key, None, transpose
    match = _BLOCK.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES and int(match.group(1)) < args.num_layers:
        key, transpose = _LAYER_NAMES[match.group(2)]
        return key, int(match.group(1)), transpose
    raise ValueError(f"GGUF tensor {name!r} is not part of a supported Llama-family model")


def load_gguf(path, dtype=np.float32, progress: bool = True) -> Checkpoint:
    reader = gguf.GGUFReader(str(path))
    arch = _meta(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(SUPPORTED_ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    # numpy shape = reversed ggml ne; quantized data has a byte shape, so use t.shape.
    shapes = {n: tuple(int(s) for s in reversed(t.shape)) for n, t in tensors.items()}
    freqs_t = tensors.pop("rope_freqs.weight", None)
    args = _model_args(reader, arch, shapes, _dequantize(freqs_t) if freqs_t is not None else None)
    dtype = np.dtype(dtype)
    weights: dict[str, np.ndarray] = {}
    filled: dict[str, int] = {}  # layers written per stacked key; np.empty leaves garbage otherwise
    for name, t in tqdm(tensors.items(), desc="dequantizing GGUF", unit="tensor", file=sys.stderr,
                        disable=not progress):
        key, layer, transpose = _place(name, args)
        w = _dequantize(t).reshape(shapes[name])
        if SUPPORTED_ARCHS[arch] and key in ("wq", "bq", "wk", "bk"):
            w = reverse_permute(w, args.num_heads if key in ("wq", "bq") else args.num_kv_heads)
        put_weight(weights, filled, args.num_layers, key, layer, w.T if transpose else w, dtype)
    if short := missing_layers(filled, args.num_layers):
        raise ValueError(f"GGUF file lacks some of the {args.num_layers} layers' tensors for {short}")
    check_weights(args, weights)
    return Checkpoint(args=args, weights=weights, tokenizer=Tokenizer.from_gguf(reader))
