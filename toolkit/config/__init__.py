"""Config schema, validation and a notebook-friendly way to compose the Hydra config."""

from __future__ import annotations

import pathlib

CONF_DIR = pathlib.Path(__file__).resolve().parent.parent.parent / "conf"


def load_config(overrides: list[str] | None = None, config_name: str = "run"):
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, as the command line would.

    Returns the typed dataclass (e.g. ``RunConfig``), not a DictConfig.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from toolkit.config import schema

    schema.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(compose(config_name, overrides=list(overrides or [])))
