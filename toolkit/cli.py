"""One shape for every Hydra entry point (run, serve, benchmarks): logs on stderr, the typed
config, and an impossible config ends the process with its message and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

import hydra
from omegaconf import DictConfig, OmegaConf

from toolkit import logs
from toolkit.config import CONF_DIR, schema
from toolkit.config.validate import ConfigError


def hydra_main(job: Callable, config_name: str = "run") -> Callable[[], None]:
    """``main = hydra_main(job)``: a command-line entry point composing ``conf/<config_name>``
    with the overrides given, then calling ``job(cfg)`` with the typed dataclass (Hydra's
    multirun ``-m`` calls it once per combination)."""
    schema.register()

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        logs.setup()
        try:
            job(OmegaConf.to_object(cfg))
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            sys.exit(2)

    return _main
