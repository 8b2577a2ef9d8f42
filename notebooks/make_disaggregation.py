"""Writes notebooks/disaggregation.ipynb (run from the repository root: python notebooks/make_disaggregation.py;
then execute it, e.g. jupyter nbconvert --to notebook --execute --inplace notebooks/disaggregation.ipynb)."""
import nbformat as nbf

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# Prefill/decode disaggregation in one process

Two engines of the default model in one process: a **prefill** engine computes a prompt's KV cache chunk by chunk and writes each finished chunk straight into the pages a **decode** engine pre-allocated; the decode engine then generates. The `inproc` backend runs the same protocol as NIXL (rooms, handshake, chunked transfers, the aux record with the first token), with a jitted copy between the two pools. The spec: `docs/pd_protocol.md`."""),
code("""import os, sys, pathlib, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path.cwd() if (pathlib.Path.cwd() / "conf").exists() else pathlib.Path.cwd().parent
sys.path.insert(0, str(ROOT))

from toolkit.config import load_config
from toolkit.disagg.pair import PDPair
from toolkit.engine.engine import Engine, resolve_dtype
from toolkit.engine.request import SamplingParams
from toolkit.models.loader import load_checkpoint

# small prefill chunks, so one prompt takes several chunks (and several transfers)
cfg = load_config(["transfer=inproc", "engine.num_pages=128", "engine.chunk_size=32"])
ckpt = load_checkpoint(cfg.model)
pair = PDPair(ckpt, cfg.engine, cfg.transfer, resolve_dtype(cfg.model.dtype))
tok = pair.decode.engine.tokenizer
print("prefill control:", pair.prefill.control.address, " decode control:", pair.decode.control.address)"""),
md("## One request, traced through the room states"),
code("""question = ("Here are some facts. The Eiffel Tower is in Paris. The Colosseum is in Rome. "
            "The Sagrada Familia is in Barcelona. Big Ben is in London. The Parthenon is in Athens. "
            "Question: in which city is the Colosseum? Answer in one short sentence.")
ids = tok.encode(pair.decode.engine.chat_prompt(question))
params = SamplingParams(max_new_tokens=24)
room = pair.submit(ids, params)
while not (room.error or (room.seq.is_finished and room.state.value == "Success")):
    pair.step()
pr = pair.prefill.rooms[room.room]
t0 = room.history[0][0]
events = sorted([(t, "decode ", s) for t, s in room.history] + [(t, "prefill", s) for t, s in pr.history])
for t, side, state in events:
    print(f"{(t - t0) * 1e3:8.1f} ms  {side} -> {state}")
print(f"{(room.seq.finish_time - t0) * 1e3:8.1f} ms  decode  finished generating ({room.seq.finish_reason})")
print()
print(len(ids), "prompt tokens ->", room.seq.text)"""),
md("## The pages it used on each side\n\nPrefill computed the prompt in its own pages; decode pre-allocated its pages and told prefill where to write. Page 0 is the padding page on both sides and never appears."),
code("""S = cfg.engine.page_size
print(f"page size {S}: {len(ids)} prompt tokens -> {len(pr.meta.dst_pages)} pages")
print(f"{'prompt tokens':>15}  {'prefill page':>12}  {'decode page':>11}")
for i, (src, dst) in enumerate(zip(pr.src_pages, pr.meta.dst_pages)):
    lo, hi = i * S, min((i + 1) * S, len(ids))
    print(f"{lo:>7}..{hi - 1:<6}  {src:>12}  {dst:>11}")
print("decode pages now (prompt + generated):", room.seq.pages or "(finished, freed)")
print("aux record:", pair.decode.aux.records[pr.meta.aux_slot])"""),
md("## Transfers: one per prompt chunk, the last with the aux record"),
code("""import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = [(i, (done - posted) * 1e3, n) for i, (posted, done, n) in enumerate(pr.transfers)]
for i, ms, n in rows:
    print(f"transfer {i}: {n} pages in {ms:.2f} ms" + ("   (last: + aux record)" if i == len(rows) - 1 else ""))
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar([r[0] for r in rows], [r[1] for r in rows])
for i, ms, n in rows:
    ax.annotate(f"{n} pages", (i, ms), ha="center", va="bottom", fontsize=8)
ax.set_xlabel("transfer (prompt chunk)"); ax.set_ylabel("ms"); ax.set_title("inproc transfer time per chunk")
fig.tight_layout(); plt.show()"""),
md("## The same answer as the unified engine"),
code("""unified = Engine(ckpt, cfg.engine, resolve_dtype(cfg.model.dtype))
ref = unified.generate([ids], params)[0]
print("unified:", ref.text)
print("P/D    :", room.seq.text)
assert ref.token_ids == room.seq.output_ids
while not (pair.prefill.idle() and pair.decode.idle()):
    pair.step()
print("pages in use after the request: prefill", pair.prefill.engine.stats().pages_used,
      " decode", pair.decode.engine.stats().pages_used)
pair.close()"""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/disaggregation.ipynb")
