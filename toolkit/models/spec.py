"""What every loader hands the engine: hyper-parameters, weights, tokenizer.

Weights are a flat dict of numpy arrays in *our* layout (``x @ W``
orientation, layers stacked on a leading axis so the forward pass scans them):

    embed       [V, D]
    final_norm  [D]
    lm_head     [D, V]          absent when embeddings are tied
    attn_norm   [L, D]
    wq          [L, D, H*Dh]    rows/cols in HF "rotate_half" RoPE order
    wk          [L, D, KV*Dh]
    wv          [L, D, KV*Dh]
    wo          [L, H*Dh, D]
    mlp_norm    [L, D]
    w_gate      [L, D, F]
    w_up        [L, D, F]
    w_down      [L, F, D]
    bq, bk, bv  [L, H*Dh] / [L, KV*Dh]   optional (attention bias)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
OPTIONAL_LAYER_KEYS = ("bq", "bk", "bv")
# engine.layer_loop: how forward runs the layers (see toolkit/models/llama.py)
LAYER_LOOPS = ("auto", "scan", "unroll")


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a Llama-family decoder, read from the checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # HF-style dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048

    def __post_init__(self):
        assert self.num_heads % self.num_kv_heads == 0, "GQA needs num_heads % num_kv_heads == 0"

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_weights(args: ModelArgs, weights: dict[str, np.ndarray]) -> None:
    """Raise ValueError naming the first weight whose shape disagrees with ``args``."""
    L, D, F, V = args.num_layers, args.hidden_size, args.intermediate_size, args.vocab_size
    qd, kd = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    want = {
        "embed": (V, D), "final_norm": (D,),
        "attn_norm": (L, D), "wq": (L, D, qd), "wk": (L, D, kd), "wv": (L, D, kd),
        "wo": (L, qd, D), "mlp_norm": (L, D),
        "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
    }
    if not args.tie_word_embeddings:
        want["lm_head"] = (D, V)
    for opt, n in (("bq", qd), ("bk", kd), ("bv", kd)):
        if opt in weights:
            want[opt] = (L, n)
    for name, shape in want.items():
        if name not in weights:
            raise ValueError(f"checkpoint lacks weight {name!r}")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weight {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")


def put_weight(weights: dict[str, np.ndarray], filled: dict[str, int], num_layers: int, key: str,
               layer: int | None, w: np.ndarray, dtype) -> None:
    """Store one loaded tensor: whole when ``layer`` is None, else as row ``layer`` of the
    stacked ``[L, ...]`` array (counted in ``filled`` so missing layers can be reported)."""
    if layer is None:
        weights[key] = np.ascontiguousarray(w, dtype=dtype)
        return
    if key not in weights:
        weights[key] = np.empty((num_layers, *w.shape), dtype=dtype)
    weights[key][layer] = w
    filled[key] = filled.get(key, 0) + 1


def missing_layers(filled: dict[str, int], num_layers: int) -> list[str]:
    """Stacked weights that did not get a tensor for every layer."""
    return [k for k, n in filled.items() if n != num_layers]
