"""Start a worker server: ``python -m serve role=prefill transfer=nixl server.port=8001``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from toolkit import logs
from toolkit.config import schema
from toolkit.config.validate import ConfigError, validate

schema.register()


def build_pd_worker(cfg):
    from toolkit.disagg.pair import make_worker
    from toolkit.engine.engine import Engine, resolve_dtype
    from toolkit.models.loader import load_checkpoint

    validate(cfg)
    ckpt = load_checkpoint(cfg.model)
    engine = Engine(ckpt, cfg.engine, resolve_dtype(cfg.model.dtype),
                    keep_pages_on_finish=cfg.role.name == "prefill")
    return make_worker(cfg.role.name, engine, cfg.transfer, cfg.role.control_address)


@hydra.main(version_base=None, config_path="../conf", config_name="run")
def main(cfg: DictConfig) -> None:
    import uvicorn

    logs.setup()
    cfg = OmegaConf.to_object(cfg)
    try:
        if cfg.role.name not in ("prefill", "decode"):
            raise ConfigError(f"role.name={cfg.role.name}: this server runs role=prefill or role=decode "
                              "(the unified OpenAI server and the router come with the serving issue)")
        worker = build_pd_worker(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    from serve.pd_worker import create_app

    print(f"{cfg.role.name} worker: http://{cfg.server.host}:{cfg.server.port} "
          f"control={worker.control.address}", file=sys.stderr, flush=True)
    uvicorn.run(create_app(worker), host=cfg.server.host, port=cfg.server.port, log_level=cfg.server.log_level)


if __name__ == "__main__":
    main()
