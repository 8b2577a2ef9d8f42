"""Writes notebooks/prefix_cache.ipynb (run from the repository root: python notebooks/make_prefix_cache.py;
then execute it, e.g. jupyter nbconvert --to notebook --execute --inplace notebooks/prefix_cache.ipynb)."""
import nbformat as nbf

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# Prefix caching across prefill and decode

One conversation of several turns through two P/D pairs in one process (`inproc`): one with no prefix cache, one with `cache=radix` on both engines. With the cache, the **decode** engine keeps each finished turn's KV (prompt and answer) in its radix tree, so the next turn asks prefill only for the pages it lacks: the new user message and the last partial page. The **prefill** engine also keeps what it computed, so it prefills only what is new. The answers are the same token for token."""),
code("""import os, sys, pathlib, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path.cwd() if (pathlib.Path.cwd() / "conf").exists() else pathlib.Path.cwd().parent
sys.path.insert(0, str(ROOT))

from toolkit.config import load_config
from toolkit.config.schema import CacheConfig
from toolkit.disagg.pair import PDPair
from toolkit.engine.engine import resolve_dtype
from toolkit.engine.request import SamplingParams
from toolkit.models.loader import load_checkpoint

cfg = load_config(["transfer=inproc", "engine.num_pages=512", "engine.chunk_size=64"])
ckpt = load_checkpoint(cfg.model)
dtype = resolve_dtype(cfg.model.dtype)
none, radix = CacheConfig(policy="none"), CacheConfig(policy="radix")  # (radix: the default)
plain = PDPair(ckpt, cfg.engine, cfg.transfer, dtype, prefill_cache=none, decode_cache=none)
cached = PDPair(ckpt, cfg.engine, cfg.transfer, dtype, prefill_cache=radix, decode_cache=radix)
tok = cached.decode.engine.tokenizer
S = cfg.engine.page_size
print("page size", S)"""),
md("## Four turns, with and without the cache"),
code("""system = ("You are a helpful assistant. Facts: the Eiffel Tower is in Paris, the Colosseum in Rome, "
          "the Sagrada Familia in Barcelona, Big Ben in London, the Parthenon in Athens.")
questions = ["Where is the Colosseum?", "And Big Ben?", "Which of them is the oldest?", "Thank you!"]
params = SamplingParams(max_new_tokens=24)

def run(pair, msgs):
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    before = pair.prefill.stats["transfer_bytes"]
    t0 = time.perf_counter()
    room = pair.submit(ids, params)
    while not room.over:
        pair.step()
    while not (pair.prefill.idle() and pair.decode.idle()):
        pair.step()
    seq = room.seq
    return dict(ids=ids, text=seq.text, tokens=list(seq.output_ids), ttft_ms=(seq.first_token_time - t0) * 1e3,
                cached=seq.num_cached, bytes=pair.prefill.stats["transfer_bytes"] - before)

def conversation(pair, system):
    msgs, out = [{"role": "system", "content": system}], []
    for q in questions:
        msgs.append({"role": "user", "content": q})
        out.append(run(pair, msgs))
        msgs.append({"role": "assistant", "content": out[-1]["text"]})
    return out

# On CPU step shapes compile on first use (engine.warmup is off there): a first conversation
# with another system prompt compiles them, so the TTFTs below are serving, not compiling.
# (The test suite runs notebooks with TOOLKIT_NOTEBOOK_TEST=1 and checks no TTFT: it skips this.)
for pair in (plain, cached) if not os.environ.get("TOOLKIT_NOTEBOOK_TEST") else ():
    conversation(pair, system.replace("Paris", "Lyon").replace("Rome", "Pisa"))
    for w in (pair.prefill, pair.decode):
        w.engine.flush_cache()
rows = {"none": conversation(plain, system), "radix": conversation(cached, system)}

page_bytes = rows["none"][0]["bytes"] / -(-len(rows["none"][0]["ids"]) // S)
print(f"{'turn':>4} {'prompt':>6} {'cached (decode)':>15} {'pages moved: none':>18} {'radix':>6} {'TTFT ms: none':>14} {'radix':>6}")
for t, (a, b) in enumerate(zip(rows["none"], rows["radix"]), 1):
    assert a["tokens"] == b["tokens"], "the cache changed an answer"
    print(f"{t:>4} {len(b['ids']):>6} {b['cached']:>15} {a['bytes'] / page_bytes:>18.0f} {b['bytes'] / page_bytes:>6.0f}"
          f" {a['ttft_ms']:>14.0f} {b['ttft_ms']:>6.0f}")
print()
for t, r in enumerate(rows["radix"], 1):
    print(f"turn {t}: {r['text']!r}")"""),
md("## What decode's tree holds now\n\nEach line is a node: a run of whole pages, the tokens they hold, and how many requests hold it locked (0: evictable, least recently used first)."),
code("""for line in cached.decode.engine.describe_prefix_cache():
    print(line)
st = cached.decode.engine.stats()
print(f"\\ndecode: {st.pages_cached} pages cached, {st.pages_evictable} evictable, {st.cached_tokens} prompt tokens served from the cache")
print(f"prefill: {cached.prefill.engine.stats().cached_tokens} prompt tokens served from its cache")"""),
md("## Time to first token per turn"),
code("""import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
turns = range(1, len(questions) + 1)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(turns, [r["ttft_ms"] for r in rows["none"]], "o-", label="cache=none")
ax.plot(turns, [r["ttft_ms"] for r in rows["radix"]], "o-", label="cache=radix")
ax.set_xticks(list(turns)); ax.set_xlabel("turn"); ax.set_ylabel("TTFT (ms)"); ax.legend()
ax.set_title("P/D, one process: time to first token per turn")
fig.tight_layout(); plt.show()
for pair in (plain, cached):
    for w in (pair.prefill, pair.decode):
        w.engine.flush_cache()
        assert w.engine.stats().pages_free == w.engine.stats().pages_usable
    pair.close()"""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/prefix_cache.ipynb")
