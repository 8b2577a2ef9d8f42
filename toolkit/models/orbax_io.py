"""Our own checkpoint directory: fast to load, already in our layout.

    <path>/weights/        orbax StandardCheckpointer tree {name: array}
    <path>/args.json       ModelArgs
    <path>/tokenizer.json, tokenizer_meta.json   (Tokenizer.save)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from toolkit.models.checkpoint import Checkpoint
from toolkit.models.spec import ModelArgs, check_weights
from toolkit.models.tokenizer import Tokenizer

ARGS_FILE = "args.json"
WEIGHTS_DIR = "weights"


def save_orbax(ckpt: Checkpoint, path: str | Path, overwrite: bool = True) -> Path:
    d = Path(path).absolute()  # orbax insists on absolute paths
    if d.exists():
        if not overwrite:
            raise FileExistsError(f"{d} exists")
        shutil.rmtree(d)
    d.mkdir(parents=True)
    with ocp.StandardCheckpointer() as saver:
        saver.save(d / WEIGHTS_DIR, dict(ckpt.weights))
    (d / ARGS_FILE).write_text(json.dumps(ckpt.args.to_dict(), indent=1))
    ckpt.tokenizer.save(d)
    return d


def load_orbax(path: str | Path, dtype=None) -> Checkpoint:
    """``dtype`` None keeps the stored dtype."""
    d = Path(path).absolute()
    if not (d / ARGS_FILE).is_file() or not (d / WEIGHTS_DIR).is_dir():
        raise FileNotFoundError(f"{d} is not a checkpoint written by `python -m toolkit.convert` "
                                f"(needs {ARGS_FILE} and {WEIGHTS_DIR}/)")
    args = ModelArgs.from_dict(json.loads((d / ARGS_FILE).read_text()))
    with ocp.StandardCheckpointer() as loader:
        weights = dict(loader.restore(d / WEIGHTS_DIR))  # numpy arrays when saved from numpy
    weights = {k: np.asarray(v) if dtype is None else np.asarray(v).astype(dtype, copy=False)
               for k, v in weights.items()}
    check_weights(args, weights)
    return Checkpoint(args=args, weights=weights, tokenizer=Tokenizer.load(d))
