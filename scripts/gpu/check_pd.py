"""P/D on GPUs: prefill and decode as two processes, KV pools registered as VRAM with NIXL.

    python scripts/gpu/check_pd.py --src 0 --dst 0    # two processes sharing one GPU
    python scripts/gpu/check_pd.py --src 0 --dst 1    # prefill on GPU 0, decode on GPU 1

Greedy outputs (16 concurrent requests with the protocol's edge cases, float32) must equal
the unified engine's, computed in this process on the GPU. Prints a summary line per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # two processes share a GPU

from tests.disagg.conftest import edge_params, edge_prompts, unified_reference  # noqa: E402
from tests.disagg.procs import Worker, run_concurrently  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="0")
    ap.add_argument("--dst", default="0")
    ap.add_argument("--wait", type=float, default=120.0)
    a = ap.parse_args()
    from tests.conftest import TINY_MODEL
    from toolkit.models.loader import load_checkpoint

    env = lambda dev: {"JAX_PLATFORMS": "cuda", "CUDA_VISIBLE_DEVICES": dev,  # noqa: E731
                       "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    tcfg = [f"transfer.wait_timeout_s={a.wait}", f"transfer.bootstrap_timeout_s={a.wait}", "transfer.checksum=true"]
    dec = Worker("decode", tcfg, startup_s=300, env=env(a.dst))
    pre = Worker("prefill", tcfg, startup_s=300, env=env(a.src))
    try:
        prompts, params = edge_prompts(16, seed=21), edge_params(16)
        ref = unified_reference(load_checkpoint(TINY_MODEL, progress=False), prompts, params)
        as_dict = lambda p: {k: v for k, v in dataclasses.asdict(p).items()  # noqa: E731
                             if k in ("max_new_tokens", "ignore_eos")}
        t0 = time.time()
        got = run_concurrently(pre, dec, prompts, [as_dict(p) for p in params])
        dt = time.time() - t0
        ok = sum(g.get("tokens") == r for g, r in zip(got, ref))
        errors = [g["error"] for g in got if "error" in g]
        ps, ds = pre.wait_idle(60), dec.wait_idle(60)
        print(f"RESULT src=GPU{a.src} dst=GPU{a.dst} mem={ps['mem_type']}/{ds['mem_type']} "
              f"equal_to_unified={ok}/16 errors={len(errors)} kv_bytes={ps['transfer_bytes']} "
              f"time={dt:.1f}s pages_free_after={ps['pages_used'] == 0 and ds['pages_used'] == 0}")
        for e in errors[:3]:
            print("  error:", e)
    finally:
        for w in (pre, dec):
            w.stop()
        for w in (pre, dec):
            print(f"--- {w.role} log tail"); print(open(w.log.name).read()[-1500:])


if __name__ == "__main__":
    main()
