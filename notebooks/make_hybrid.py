"""Writes notebooks/hybrid.ipynb (run from the repository root: python notebooks/make_hybrid.py;
then execute it, e.g. jupyter nbconvert --to notebook --execute --inplace notebooks/hybrid.ipynb)."""
import nbformat as nbf

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# Hybrid models: Mamba2 layers beside attention

A Bamba model replaces most layers' attention with a Mamba2 mixer, whose memory of the past
is a fixed-size recurrent state per request instead of KV pages. Here a tiny random-weight
`BambaForCausalLM` is built with `transformers` and saved as a Hugging Face directory; the
engine serves it (`model=hf model.path=DIR cache=none`), its greedy tokens are compared
with transformers' own `generate`, and a prefill/decode pair moves each request's state
in the last transfer, beside the first token."""),
code("""import os, sys, pathlib, tempfile
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path.cwd() if (pathlib.Path.cwd() / "conf").exists() else pathlib.Path.cwd().parent
sys.path.insert(0, str(ROOT))

import torch, transformers
from tests import hybrid_models   # tiny configs, random weights at a useful scale, the byte tokenizer

hf = hybrid_models.build("bamba", seed=3)   # 4 layers: Mamba2, attention, Mamba2, Mamba2
path = hybrid_models.save(hf, pathlib.Path(tempfile.mkdtemp()) / "bamba-tiny")
print(hf.config.layers_block_type)
print(sorted(p.name for p in path.iterdir()))"""),
md("""## Serve it

The prefix cache (on by default) is refused with a model that keeps recurrent state: a
cached prefix would have no state to start from. With `cache=none` the engine allocates a
state pool beside the KV pool: one slot per request that may run at once, plus a padding
slot."""),
code("""from toolkit.config import load_config
from toolkit.config.validate import ConfigError
from toolkit.run import build_engine

base = ["model=hf", f"model.path={path}", "model.name=bamba-tiny", "model.dtype=float32",
        "engine.page_size=8", "engine.max_model_len=64", "engine.chunk_size=8", "engine.max_batch_size=8",
        "engine.shape_buckets=compact", "engine.attention_backend=reference"]
try:
    build_engine(load_config(base))
except ConfigError as e:
    print("refused:", e)
engine = build_engine(load_config(base + ["cache=none"]))
a = engine.args
print(a.types, "| KV pool layers:", engine.pool.layout.num_layers)
sp = engine.state_pool.layout
print(f"state pool: {sp.num_slots} slots, conv {sp.conv_shape}, ssm {sp.ssm_shape}, "
      f"{sp.total_slot_bytes / 1024:.0f} KiB a slot")"""),
md("## Greedy tokens equal transformers'"),
code("""import numpy as np
from toolkit.engine.request import SamplingParams

rng = np.random.default_rng(11)
prompts = [rng.integers(3, hybrid_models.VOCAB, n).tolist() for n in (5, 17, 40, 23)]
ours = engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
for p, o in zip(prompts, ours):
    ref, margin = hybrid_models.hf_greedy(hf, p, 10)
    print(len(p), "prompt tokens:", o.token_ids == ref, o.token_ids)
    assert o.token_ids == ref
st = engine.stats()
print("state slots free again:", st.state_slots_free, "of", st.state_slots)"""),
md("""## Prefill and decode: the state moves with the last transfer

Decode reserves pages and a state slot and sends `state_slots=[slot]`; prefill writes the
request's final state (every Mamba2 layer) in the same transfer as the aux record."""),
code("""from toolkit.config.schema import CacheConfig, TransferConfig
from toolkit.disagg.pair import PDPair
from toolkit.models.hf_loader import load_hf_dir

ckpt = load_hf_dir(path, progress=False)
pair = PDPair(ckpt, engine.cfg, TransferConfig(backend="inproc"),
              prefill_cache=CacheConfig(policy="none"), decode_cache=CacheConfig(policy="none"))
metas = []
send = pair.decode.control.send
pair.decode.control.send = lambda peer, m: (metas.append(m) if m["type"] == "room_meta" else None, send(peer, m))[1]
got = pair.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
print("P/D tokens equal the unified engine's:", [g.token_ids for g in got] == [o.token_ids for o in ours])
print("state slots sent:", [m["state_slots"] for m in metas])
print("KV bytes moved:", pair.prefill.stats["transfer_bytes"])
pair.close()"""),
md("""## How much memory a request holds

Per request, attention layers grow with the context (pages), Mamba2 layers do not (one
state slot). For this tiny model and for the Bamba-9B shape:"""),
code("""import matplotlib
import matplotlib.pyplot as plt
from toolkit.cache.pool import PoolLayout
from toolkit.cache.state_pool import StateLayout
from toolkit.models.spec import ModelArgs
import jax.numpy as jnp

def per_request(args, dtype, ctx):
    page = PoolLayout.for_model(args, 1, 16, dtype).total_bytes
    state = StateLayout.for_model(args, 1, dtype).total_slot_bytes if args.has_state else 0
    return [(-(-c // 16)) * page / 2**20 for c in ctx], state / 2**20

bamba9 = ModelArgs(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                   num_kv_heads=8, head_dim=128, architecture="bamba",
                   layer_types=tuple("attention" if i in (9, 18, 27) else "mamba" for i in range(32)),
                   mamba=dict(num_heads=128, head_dim=64, state_size=128, n_groups=1, conv_kernel=4, chunk_size=256),
                   partial_rotary_factor=0.5)
llama8 = ModelArgs(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                   num_kv_heads=8, head_dim=128)
ctx = [1024 * k for k in (1, 2, 4, 8, 16, 32)]
kv_b, st_b = per_request(bamba9, jnp.bfloat16, ctx)
kv_l, _ = per_request(llama8, jnp.bfloat16, ctx)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(ctx, kv_l, "o-", label="Llama-3-8B shape: KV")
ax.plot(ctx, [k + st_b for k in kv_b], "o-", label="Bamba-9B shape: KV (3 layers) + state")
ax.set_xscale("log", base=2); ax.set_xlabel("context (tokens)"); ax.set_ylabel("MiB per request (bf16 KV)")
ax.legend(); ax.grid(alpha=0.3); plt.tight_layout()
if matplotlib.get_backend().lower() != "agg":
    plt.show()
print(f"Bamba-9B state: {st_b:.0f} MiB a request, whatever the context")"""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/hybrid.ipynb")
