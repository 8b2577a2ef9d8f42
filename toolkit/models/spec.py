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

Hybrid models (``architecture`` bamba or mamba2; ``layer_types`` says which layers are
attention and which are Mamba2 mixers) stack each key over the layers that have it:
``attn_norm``, ``mlp_norm`` and the MLP over all L layers (a mamba2 model has no MLP and
no ``mlp_norm``), the attention keys over the La attention layers, and the mixer's keys,
prefixed ``m_``, over the Lm Mamba2 layers (``toolkit/models/mamba2.py`` MIXER_KEYS):

    m_in_proj   [Lm, D, I + conv_dim + H]     m_conv_w [Lm, conv_dim, K]   m_conv_b [Lm, conv_dim]
    m_dt_bias, m_A_log, m_D  [Lm, H]          m_norm_w [Lm, I]             m_out_proj [Lm, I, D]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
OPTIONAL_LAYER_KEYS = ("bq", "bk", "bv")
# engine.layer_loop: how forward runs the layers (see toolkit/models/llama.py)
LAYER_LOOPS = ("auto", "scan", "unroll")
# ModelArgs.architecture: which forward runs it (llama: toolkit/models/llama.py; the hybrids
# with Mamba2 layers: toolkit/models/hybrid.py)
ARCHITECTURES = ("llama", "bamba", "mamba2")
STATE_ARCHITECTURES = ("bamba", "mamba2")  # with Mamba2 layers: per-request recurrent state
ATTENTION, MAMBA = "attention", "mamba"  # ModelArgs.layer_types entries
# keys stacked over all layers / the attention layers / the Mamba2 layers of a hybrid
HYBRID_ALL_KEYS = ("attn_norm", "mlp_norm", "w_gate", "w_up", "w_down")
ATTENTION_KEYS = ("wq", "wk", "wv", "wo")
MAMBA_KEYS = ("m_in_proj", "m_conv_w", "m_dt_bias", "m_A_log", "m_D", "m_norm_w", "m_out_proj")
OPTIONAL_MAMBA_KEYS = ("m_conv_b", "m_in_proj_b", "m_out_proj_b")


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
    # hybrids (toolkit/models/hybrid.py): the forward, each layer's type (() = all
    # attention), the Mamba2 layers' hyper-parameters (``mamba2.MambaArgs.to_dict()``), the
    # fraction of each head RoPE rotates (Bamba: 0.5), and whether layers have an MLP
    architecture: str = "llama"
    layer_types: tuple[str, ...] = ()
    mamba: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    has_mlp: bool = True

    def __post_init__(self):
        assert self.num_heads % self.num_kv_heads == 0, "GQA needs num_heads % num_kv_heads == 0"
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # (JSON gives a list)
        assert self.architecture in ARCHITECTURES, f"architecture {self.architecture!r}"
        assert not self.layer_types or len(self.layer_types) == self.num_layers, "one layer type per layer"
        assert set(self.layer_types) <= {ATTENTION, MAMBA}, f"layer types {set(self.layer_types)}"
        assert (MAMBA in self.layer_types) == (self.mamba is not None), "Mamba2 layers need their args"

    @property
    def types(self) -> tuple[str, ...]:
        """Every layer's type."""
        return self.layer_types or (ATTENTION,) * self.num_layers

    @property
    def num_attn_layers(self) -> int:
        """Layers with KV in the pool (the pool's L)."""
        return self.types.count(ATTENTION)

    @property
    def num_mamba_layers(self) -> int:
        return self.types.count(MAMBA)

    @property
    def has_state(self) -> bool:
        """Per-request recurrent state (Mamba2 layers): a state slot per request."""
        return self.num_mamba_layers > 0

    @property
    def is_hybrid(self) -> bool:
        return self.architecture != "llama"

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
    La, Lm = args.num_attn_layers, args.num_mamba_layers
    qd, kd = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    want = {"embed": (V, D), "final_norm": (D,), "attn_norm": (L, D)}
    if La:
        want |= {"wq": (La, D, qd), "wk": (La, D, kd), "wv": (La, D, kd), "wo": (La, qd, D)}
    if args.has_mlp:
        want |= {"mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D)}
    if Lm:
        from toolkit.models.mamba2 import MambaArgs

        m = MambaArgs.from_dict(args.mamba)
        H, I, C, K = m.num_heads, m.intermediate_size, m.conv_dim, m.conv_kernel
        want |= {"m_in_proj": (Lm, D, I + C + H), "m_conv_w": (Lm, C, K), "m_dt_bias": (Lm, H),
                 "m_A_log": (Lm, H), "m_D": (Lm, H), "m_norm_w": (Lm, I), "m_out_proj": (Lm, I, D)}
        for opt, shape in (("m_conv_b", (Lm, C)), ("m_in_proj_b", (Lm, I + C + H)), ("m_out_proj_b", (Lm, D))):
            if opt in weights:
                want[opt] = shape
    if not args.tie_word_embeddings:
        want["lm_head"] = (D, V)
    for opt, n in (("bq", qd), ("bk", kd), ("bv", kd)):
        if opt in weights:
            want[opt] = (La, n)
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


def missing_layers(filled: dict[str, int], num_layers: int | dict[str, int]) -> list[str]:
    """Stacked weights that did not get a tensor for every layer (``num_layers``: one count,
    or a count per key: a hybrid stacks keys over the layers of their type)."""
    want = num_layers if isinstance(num_layers, dict) else dict.fromkeys(filled, num_layers)
    return [k for k, n in filled.items() if n != want[k]]


def stack_index(args: ModelArgs, key: str, layer: int) -> tuple[int, int] | None:
    """A hybrid's per-layer ``key`` of model layer ``layer`` -> (row in its stacked array,
    rows of that array), or None if that layer has no such weight (hybrid_layers' rule)."""
    types = args.types
    if key in HYBRID_ALL_KEYS:
        return layer, args.num_layers
    kind = MAMBA if key.startswith("m_") else ATTENTION
    if types[layer] != kind:
        return None
    return types[:layer].count(kind), types.count(kind)
