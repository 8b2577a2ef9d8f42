"""Greedy tokens of the default model on this GPU against the CPU reference tokens.

    python scripts/gpu/check_tokens.py                    # on a GPU: float32 and bfloat16 runs, engine=gpu
    python scripts/gpu/check_tokens.py --engine default   # the CPU-sized engine config on the GPU
    python scripts/gpu/check_tokens.py --make-reference   # on CPU: rewrites the reference tokens

The CPU float32 tokens equal HF transformers' (tests/engine/test_oracle_smollm2.py).
Prints, per prompt and dtype, how many leading tokens agree with the reference.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.engine.test_oracle_smollm2 import CHAT, NEW_TOKENS, RAW  # noqa: E402
from toolkit.config import load_config  # noqa: E402
from toolkit.engine.request import SamplingParams  # noqa: E402

REF = ROOT / "tests" / "data" / "smollm2_greedy_ref.json"


def greedy(dtype: str, overrides: list[str]) -> dict:
    from toolkit.run import build_engine

    engine = build_engine(load_config([f"model.dtype={dtype}"] + overrides))
    tok = engine.tokenizer
    prompts = [tok.encode(engine.chat_prompt(p)) for p in CHAT] + [tok.encode(p) for p in RAW]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    return {"prompts": prompts, "tokens": [o.token_ids for o in outs], "texts": [o.text for o in outs]}


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-reference", action="store_true")
    ap.add_argument("--engine", default="gpu")
    args = ap.parse_args()
    if args.make_reference:
        REF.parent.mkdir(parents=True, exist_ok=True)
        ref = {d: greedy(d, ["engine.num_pages=256"]) for d in ("float32", "bfloat16")}
        REF.write_text(json.dumps(ref))
        return
    ref = json.loads(REF.read_text())
    rows = []
    for dtype in ("float32", "bfloat16"):
        got = greedy(dtype, [f"engine={args.engine}"])
        for i, (g, r) in enumerate(zip(got["tokens"], ref[dtype]["tokens"])):
            rows.append((dtype, i, agree(g, r), agree(g, ref["float32"]["tokens"][i]), got["texts"][i][:60]))
    print(f"{'dtype':>9} {'prompt':>6} {'=cpu same dtype':>15} {'=cpu fp32/HF':>12}  text")
    for d, i, a, b, t in rows:
        print(f"{d:>9} {i:>6} {a:>13}/{NEW_TOKENS} {b:>10}/{NEW_TOKENS}  {t!r}")


if __name__ == "__main__":
    main()
