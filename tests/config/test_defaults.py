"""Config defaults live in the dataclasses (toolkit/config/schema.py); conf/*.yaml only says
what differs from them."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from toolkit.config import CONF_DIR, load_config, schema

# group -> the dataclass its YAML files fill (conf/bench/ has its own schemas: toolkit/bench)
GROUPS = {"model": schema.ModelConfig, "engine": schema.EngineConfig, "role": schema.RoleConfig,
          "cache": schema.CacheConfig, "transfer": schema.TransferConfig, "server": schema.ServerConfig}


def _default(cls, f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@pytest.mark.parametrize("path", sorted(p for g in GROUPS for p in (CONF_DIR / g).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_repeats_no_default(path):
    """Guards against a default written twice (dataclass and YAML) that then drifts, as
    engine.max_model_len did (0 in the dataclass, 2048 in conf/engine/default.yaml)."""
    cls = GROUPS[path.parent.name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    values.pop("defaults", None)
    assert set(values) <= set(fields), f"{path}: keys the schema does not have: {set(values) - set(fields)}"
    same = [k for k, v in values.items() if v == _default(cls, fields[k])]
    assert not same, f"{path} repeats the schema's defaults for {same}; drop them from the YAML"


def test_default_command_line_engine_is_the_dataclass_default():
    """Guards against the command line and a directly built EngineConfig() meaning different
    engines: with no overrides they are equal, including max_model_len=2048."""
    cfg = load_config([])
    assert cfg.engine == schema.EngineConfig()
    assert cfg.engine.max_model_len == 2048
    assert cfg.role == schema.RoleConfig() and cfg.cache == schema.CacheConfig()
    assert cfg.transfer == schema.TransferConfig() and cfg.server == schema.ServerConfig()


def test_gpu_engine_changes_only_its_values():
    """engine=gpu differs from the default engine in exactly the keys conf/engine/gpu.yaml sets."""
    gpu = load_config(["engine=gpu"]).engine
    keys = set(OmegaConf.load(CONF_DIR / "engine" / "gpu.yaml")) - {"defaults"}
    changed = {f.name for f in dataclasses.fields(gpu) if getattr(gpu, f.name) != getattr(schema.EngineConfig(), f.name)}
    assert changed == keys
    assert gpu.memory_fraction == 0.5 and gpu.num_pages == 0 and gpu.max_model_len == 8192
