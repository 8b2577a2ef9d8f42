"""Start a worker server: ``python -m serve role=prefill transfer=nixl server.port=8001``."""

from __future__ import annotations

import sys

from toolkit.cli import hydra_main
from toolkit.config.validate import validate


def build_pd_worker(cfg):
    from toolkit.disagg.pair import make_worker
    from toolkit.engine.engine import Engine

    validate(cfg)
    prefill = cfg.role.name == "prefill"
    engine = Engine.from_config(cfg.model, cfg.engine, keep_pages_on_finish=prefill, cache=cfg.cache,
                                prefill_only=prefill, transfer_rooms=cfg.transfer.max_rooms)
    return make_worker(cfg.role.name, engine, cfg.transfer, cfg.role.control_address)


def _tokenizer_and_context(model_cfg):
    """What the router needs of the model: its tokenizer and context length. A random
    model's are known without building its weights (an 8B shape would take gigabytes)."""
    if model_cfg.source == "random":
        from toolkit.models.random_init import TINY_ARGS, byte_tokenizer

        return byte_tokenizer(), dict(TINY_ARGS, **model_cfg.random)["max_position_embeddings"]
    from toolkit.models.loader import load_checkpoint

    ckpt = load_checkpoint(model_cfg, progress=False)
    return ckpt.tokenizer, ckpt.args.max_position_embeddings


def build_router(cfg):
    from serve.router import RouterBackend, create_router_app

    validate(cfg)
    tokenizer, context = _tokenizer_and_context(cfg.model)
    max_len = cfg.engine.max_model_len or context
    r = cfg.role
    return create_router_app(RouterBackend(tokenizer, cfg.model.name, max_len, r.prefill_urls,
                                           r.decode_urls, r.policy, r.health_interval_s, cfg.server.max_queue,
                                           r.cache_aware_margin, r.cache_aware_block))


def serve_job(cfg) -> None:
    import uvicorn

    if cfg.role.name == "router":
        app, where = build_router(cfg), f"OpenAI API at /v1 over {len(cfg.role.prefill_urls)} prefill " \
            f"and {len(cfg.role.decode_urls)} decode workers"
    elif cfg.role.name == "unified":
        from serve.unified import create_unified_app
        from toolkit.run import build_engine

        app = create_unified_app(build_engine(cfg), cfg.model.name, cfg.server.max_queue)
        where = "OpenAI API at /v1"
    else:
        from serve.pd_worker import create_app

        worker = build_pd_worker(cfg)
        app, where = create_app(worker), f"control={worker.control.address}"
    print(f"{cfg.role.name} worker: http://{cfg.server.host}:{cfg.server.port} {where}", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=cfg.server.host, port=cfg.server.port, log_level=cfg.server.log_level)


main = hydra_main(serve_job)


if __name__ == "__main__":
    main()
