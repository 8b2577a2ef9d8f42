"""Greedy tokens of tiny random hybrids (Bamba: attention + Mamba2; Mamba2: mixers only) in
float32 on this GPU against the CPU's.

    python scripts/gpu/check_hybrid_tokens.py                  # on a GPU: compare with the stored CPU tokens
    python scripts/gpu/check_hybrid_tokens.py --live-cpu       # also recompute them on this host's CPU
    python scripts/gpu/check_hybrid_tokens.py --make-reference # on CPU: rewrite the stored tokens

Weights come from ``random_checkpoint`` (numpy, seeded: the same on every host). Six ragged
prompts (1 to 40 tokens) are generated at once, 24 greedy tokens each, with chunked prefill
(engine.chunk_size 16: prompts split across steps and across the SSD scan's 16-row chunks)
and the overlapped engine. On the GPU the layers are unrolled (engine.layer_loop=auto), on
the CPU scanned: the two paths the model has. GPU variants: attention_backend=reference at
matmul precision highest (float32 arithmetic: the check, exit 1 when its tokens differ
from the CPU's), the same at the default precision (on a GPU a float32 matmul then runs
in TF32: near ties may flip) and attention_backend=auto (the Pallas / Mosaic GPU kernels
where they apply), both for information.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

REF = ROOT / "tests" / "data" / "hybrid_greedy_ref.json"
NEW = 24
LENS = [1, 5, 17, 40, 23, 9]
MODELS = {
    "bamba": dict(architecture="bamba", vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=32, attn_layer_indices=[1], max_position_embeddings=2048,
                  tie_word_embeddings=False,
                  mamba=dict(num_heads=4, head_dim=32, state_size=8, n_groups=2, conv_kernel=4, chunk_size=16)),
    "mamba2": dict(architecture="mamba2", vocab_size=384, hidden_size=64, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=False,
                   mamba=dict(num_heads=4, head_dim=32, state_size=8, n_groups=2, conv_kernel=4, chunk_size=16)),
}
SEEDS = {"bamba": 3, "mamba2": 9}


def prompts() -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(11)
    return [rng.integers(3, 384, n).tolist() for n in LENS]


def greedy(kind: str, backend: str = "reference", precision: str = "default") -> list[list[int]]:
    import jax
    import jax.numpy as jnp

    from toolkit.config.schema import CacheConfig, EngineConfig
    from toolkit.engine.engine import Engine
    from toolkit.engine.request import SamplingParams
    from toolkit.models.random_init import hybrid_args, random_checkpoint
    from toolkit.models.spec import ModelArgs

    ckpt = random_checkpoint(ModelArgs(**hybrid_args(MODELS[kind])), seed=SEEDS[kind])
    # no step store: its key does not include the matmul precision
    ecfg = EngineConfig(page_size=8, num_pages=128, max_batch_size=8, chunk_size=16, max_prefill_seqs=4,
                        max_model_len=128, min_bucket=4, shape_buckets="compact", attention_backend=backend,
                        compile_cache_dir="")
    with jax.default_matmul_precision(precision):
        eng = Engine(ckpt, ecfg, jnp.float32, cache=CacheConfig(policy="none"))
        outs = eng.generate(prompts(), SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    return [list(map(int, o.token_ids)) for o in outs]


def reference() -> dict:
    import jax

    return {"jax": jax.__version__, "platform": jax.devices()[0].platform, "prompts": prompts(),
            "tokens": {k: greedy(k) for k in MODELS}}


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-reference", action="store_true", help="(CPU) rewrite the stored CPU tokens")
    ap.add_argument("--cpu-json", action="store_true", help="(CPU) print the CPU tokens as JSON")
    ap.add_argument("--live-cpu", action="store_true", help="also recompute the CPU tokens here, in a subprocess")
    args = ap.parse_args()
    if args.make_reference or args.cpu_json:
        ref = reference()
        assert ref["platform"] == "cpu", "the reference is the CPU's (JAX_PLATFORMS=cpu)"
        if args.cpu_json:
            print(json.dumps(ref))
        else:
            REF.parent.mkdir(parents=True, exist_ok=True)
            REF.write_text(json.dumps(ref) + "\n")
        return 0
    live = None
    if args.live_cpu:  # in parallel with the GPU runs
        live = subprocess.Popen([sys.executable, __file__, "--cpu-json"], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu", "TOOLKIT_LOG": "WARNING"})
    import jax

    stored = json.loads(REF.read_text())
    assert stored["prompts"] == prompts(), "the stored prompts differ: rerun --make-reference"
    refs = {f"stored CPU (jax {stored['jax']})": stored["tokens"]}
    variants = [("reference", "default"), ("reference", "highest"), ("auto", "default")]
    got = {f"{jax.devices()[0].platform} {b} {p}": {k: greedy(k, b, p) for k in MODELS} for b, p in variants}
    if live is not None:
        out, _ = live.communicate(timeout=600)
        cpu = json.loads(out.strip().splitlines()[-1])
        refs[f"live CPU (jax {cpu['jax']})"] = cpu["tokens"]
        got[f"live CPU (jax {cpu['jax']})"] = cpu["tokens"]
    print(f"# device {jax.devices()[0].device_kind} | jax {jax.__version__} | {len(LENS)} prompts x {NEW} "
          f"greedy tokens, float32")
    print("| run | vs | model | prompts equal | tokens equal (leading, summed) |")
    print("|---|---|---|---:|---:|")
    ok = True
    for name, toks in got.items():
        for rname, ref in refs.items():
            if name == rname:
                continue
            for k in MODELS:
                n_eq = sum(a == b for a, b in zip(toks[k], ref[k]))
                lead = sum(agree(a, b) for a, b in zip(toks[k], ref[k]))
                first = [agree(a, b) for a, b in zip(toks[k], ref[k]) if a != b]
                at = f" (first difference at token {first})" if first else ""
                print(f"| {name} | {rname} | {k} | {n_eq}/{len(LENS)} | {lead}/{len(LENS) * NEW}{at} |")
                if name.endswith("reference highest") and rname.startswith("stored") and n_eq != len(LENS):
                    ok = False
    print("PASS" if ok else "FAIL: the GPU reference path's float32 tokens differ from the CPU's")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
