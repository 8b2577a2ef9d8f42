"""One entry point: ModelConfig -> Checkpoint, whatever the source."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from toolkit.config.schema import ModelConfig
from toolkit.models.checkpoint import Checkpoint, find_package_file
from toolkit.models.random_init import TINY_ARGS, device_random_checkpoint, hybrid_args, random_checkpoint
from toolkit.models.spec import ModelArgs

log = logging.getLogger(__name__)

SOURCES = ("gguf", "hf", "orbax", "random")


def _path(cfg: ModelConfig, what: str) -> Path:
    if not cfg.path:
        raise ValueError(f"model.source={cfg.source} needs model.path (the {what})")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model.path={cfg.path!r} does not exist (expected the {what})")
    return path


def _gguf_path(cfg: ModelConfig) -> Path:
    if cfg.path:
        return _path(cfg, ".gguf file")
    if not (cfg.gguf_package and cfg.gguf_file):
        raise ValueError("model.source=gguf needs model.path, or model.gguf_package and model.gguf_file")
    return find_package_file(cfg.gguf_package, cfg.gguf_file)


def _random_args(cfg: ModelConfig) -> ModelArgs:
    rand = cfg.random
    overrides = OmegaConf.to_container(rand, resolve=True) if OmegaConf.is_config(rand) else dict(rand or {})
    overrides = hybrid_args(overrides)  # (a hybrid's attn_layer_indices -> layer_types)
    unknown = set(overrides) - set(ModelArgs.__dataclass_fields__)
    if unknown:
        raise ValueError(f"model.random has unknown keys {sorted(unknown)}; "
                         f"allowed: {sorted(ModelArgs.__dataclass_fields__)}")
    return ModelArgs(**{**TINY_ARGS, **overrides})


def load_checkpoint(cfg: ModelConfig, dtype=np.float32, progress: bool = True) -> Checkpoint:
    start = time.perf_counter()
    if cfg.source == "gguf":
        from toolkit.models.gguf_loader import load_gguf
        ckpt = load_gguf(_gguf_path(cfg), dtype=dtype, progress=progress)
    elif cfg.source == "hf":
        from toolkit.models.hf_loader import load_hf_dir
        ckpt = load_hf_dir(_path(cfg, "Hugging Face model directory"), dtype=dtype, progress=progress)
    elif cfg.source == "orbax":
        from toolkit.models.orbax_io import load_orbax
        ckpt = load_orbax(_path(cfg, "directory written by `python -m toolkit.convert`"), dtype=dtype)
    elif cfg.source == "random" and cfg.random_on_device:
        ckpt = device_random_checkpoint(_random_args(cfg), dtype, seed=cfg.seed)
    elif cfg.source == "random":
        ckpt = random_checkpoint(_random_args(cfg), seed=cfg.seed)
        ckpt.weights = {k: v.astype(dtype, copy=False) for k, v in ckpt.weights.items()}
    else:
        raise ValueError(f"unknown model.source {cfg.source!r}; allowed: {', '.join(SOURCES)}")
    log.info("loaded %s model %s (%.1fM params) in %.2fs", cfg.source, cfg.path or cfg.gguf_file,
             ckpt.num_params / 1e6, time.perf_counter() - start)
    return ckpt
