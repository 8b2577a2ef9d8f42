"""Convert any model source to our Orbax checkpoint directory.

    python -m toolkit.convert model=smollm2-135m output=checkpoints/smollm2-135m

Then run with ``model.source=orbax model.path=checkpoints/smollm2-135m``.
"""

from __future__ import annotations

import sys
import time

import hydra
import numpy as np
from hydra.utils import to_absolute_path

from toolkit.config import schema
from toolkit.config.schema import ModelConfig, RunConfig
from toolkit.models.loader import load_checkpoint
from toolkit.models.orbax_io import save_orbax

schema.register()


def _timed_load(cfg: ModelConfig):
    start = time.perf_counter()
    ckpt = load_checkpoint(cfg, dtype=np.float32, progress=cfg.source != "orbax")
    return ckpt, time.perf_counter() - start


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(cfg: RunConfig) -> None:
    if not cfg.output:
        raise SystemExit("convert needs output=<directory> for the Orbax checkpoint")
    out = to_absolute_path(cfg.output)
    ckpt, t_src = _timed_load(cfg.model)
    save_orbax(ckpt, out)
    orbax_cfg = ModelConfig(name=cfg.model.name, source="orbax", path=out)
    reloaded, t_orbax = _timed_load(orbax_cfg)
    same = all(np.array_equal(reloaded.weights[k], w) for k, w in ckpt.weights.items())
    print(f"wrote {out} ({ckpt.num_params / 1e6:.1f}M params, round-trip {'ok' if same else 'MISMATCH'})\n"
          f"load from {cfg.model.source}: {t_src:.2f}s\nload from orbax: {t_orbax:.2f}s", file=sys.stderr)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
