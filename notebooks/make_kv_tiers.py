"""Writes notebooks/kv_tiers.ipynb (run from the repository root: python notebooks/make_kv_tiers.py;
then execute it, e.g. jupyter nbconvert --to notebook --execute --inplace notebooks/kv_tiers.ipynb)."""
import nbformat as nbf

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# KV tiers: device, host, storage

Below the device prefix cache (the radix tree over the KV pool) an engine can keep two more tiers
(`toolkit/cache/tiers.py`): **host** memory (`cache.host_pages` or `cache.host_gb`) and **storage**
(`cache.storage=file`: fixed page slots in one preallocated file under `cache.storage_path`, written and
read by NIXL's POSIX plugin, with an index that survives a restart). Every page that enters the tree is
copied down (write-through: device -> host -> file); with `cache.decode_offload` that includes the pages a
request fills while it decodes. A match walks the device tree, then continues the chain of page hashes in
host, then in storage, and loads what it finds back (file -> host -> device) before the prefill is scheduled.

One conversation of four turns through a unified engine with a small device pool, where each turn finds its
prefix somewhere else:

| turn | before it | its prefix is found in |
|---|---|---|
| 1 | nothing | nowhere: computed |
| 2 | turn 1 ran | the device tree |
| 3 | `flush_cache()`: the device tree is evicted, the tiers keep their pages | host |
| 4 | `close()`, then a **new engine** on the same `storage_path` (one worker per directory) | storage |

The answers equal a `cache=none` engine's, token for token."""),
code("""import os, sys, pathlib, tempfile
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path.cwd() if (pathlib.Path.cwd() / "conf").exists() else pathlib.Path.cwd().parent
sys.path.insert(0, str(ROOT))

from toolkit.config import load_config
from toolkit.config.schema import CacheConfig
from toolkit.engine.engine import Engine, resolve_dtype
from toolkit.engine.request import SamplingParams
from toolkit.models.loader import load_checkpoint

# A small device pool: 15 usable pages of 16 tokens, a little more than the longest turn needs. A small
# bucket set (one page-table width, of max_model_len=256 tokens; one prefill sequence; batches up to 8):
# 6 step shapes, so engine.warmup (off on CPU by default) compiles all of them in seconds.
cfg = load_config(["engine.num_pages=16", "engine.chunk_size=64", "engine.max_model_len=256",
                   "engine.shape_buckets=compact", "engine.max_prefill_seqs=1", "engine.max_batch_size=8"])
ckpt = load_checkpoint(cfg.model)
dtype = resolve_dtype(cfg.model.dtype)
store = tempfile.TemporaryDirectory(prefix="kv-tiers-")
tiered = CacheConfig(policy="radix", host_pages=12, storage="file", storage_path=store.name,
                     storage_gb=0.05, decode_offload=True)
ref = Engine(ckpt, cfg.engine, dtype, cache=CacheConfig(policy="none"))
eng = Engine(ckpt, cfg.engine, dtype, cache=tiered)
tok, S = eng.tokenizer, cfg.engine.page_size"""),
md("""## The conversation, as token lists

Each turn's prompt is the previous prompt, the tokens the model answered (ending with `<|im_end|>`) and the
next user message in the chat template's format. Building it from tokens (instead of re-encoding the answer's
text through the chat template) keeps the answer's tokens as they were generated, so the pages
`decode_offload` copied down while the answer was decoded are found again by the next turn.

`run` submits one prompt and reads where its prefix was found: `Sequence.num_cached` (prompt tokens found in
any tier) and the deltas of `Engine.stats()` (`host_hit_tokens`, `storage_hit_tokens`: tokens loaded back
from that tier; the rest of `num_cached` was on the device). The copies down run while the engine serves;
`run` waits for them (`wait_for_copies()`) once its request is done, so each turn's traffic is its own."""),
code("""params = SamplingParams(max_new_tokens=16)
END = tok.encode("<|im_end|>")

def first_prompt(system, question):
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))

def next_prompt(ids, answer, question):
    if answer[-1:] != END:  # stopped at max_new_tokens: close the assistant's message
        answer = answer + END
    return ids + answer + tok.encode(f"\\n<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n")

def run(engine, ids, params=params):
    before = engine.stats()
    seq = engine.add_request(ids, params)
    while not seq.is_finished:
        engine.step()
    engine.sync()
    engine.wait_for_copies()  # (so that this turn's copies down are counted in its own deltas)
    after = engine.stats()
    d = lambda f: getattr(after, f) - getattr(before, f)
    host, storage = d("host_hit_tokens"), d("storage_hit_tokens")
    return dict(prompt=len(ids), tokens=list(seq.output_ids), text=seq.text,
                ttft_ms=(seq.first_token_time - seq.arrival_time) * 1e3,
                device=seq.num_cached - host - storage, host=host, storage=storage,
                computed=len(ids) - seq.num_cached,
                to_host=d("offloaded_bytes_host"), to_storage=d("offloaded_bytes_storage"),
                from_storage=d("loaded_bytes_storage"), from_host=d("loaded_bytes_host"))

system = ("You are a helpful assistant. Facts: the Eiffel Tower is in Paris, the Colosseum in Rome, "
          "the Sagrada Familia in Barcelona, Big Ben in London, the Parthenon in Athens.")
questions = ["Where is the Colosseum?", "And Big Ben?", "Which of them is the oldest?", "Thank you!"]
st = eng.stats()
print(f"device: {st.pages_usable} pages of {S} tokens; host: {st.host_slots} slots; "
      f"storage: {st.storage_slots} slots in {store.name}")"""),
md("""## Warm-up

`warmup(force=True)` runs every step shape of the bucket set, so no turn below waits for a compilation. The
tiers' own programs (the jitted page gather, device -> host, and scatter, host -> device) compile on first use:
`warm_tiers` runs a short prompt twice with a flush between, so the second run loads it back from host (on
the new engine below, the first run already finds it in storage); one token each is enough for that. Its two
pages stay in the tiers."""),
code("""class Conversation:
    def __init__(self, system):
        self.system, self.ids, self.rows = system, None, []

    def turn(self, engine):
        t, q = len(self.rows), questions[len(self.rows)]
        self.ids = first_prompt(self.system, q) if t == 0 else next_prompt(self.ids, self.rows[-1]["tokens"], q)
        self.rows.append(run(engine, self.ids))
        return self.rows[-1]

    def show(self, t):
        r = self.rows[t - 1]
        print(f"turn {t}: {r['prompt']} prompt tokens: {r['device']} found on the device, {r['host']} in host, "
              f"{r['storage']} in storage, {r['computed']} computed; TTFT {r['ttft_ms']:.0f} ms")

WARM = tok.encode("Warm-up: the quick brown fox jumps over the lazy dog, then runs around the old barn "
                  "twice before it settles down near the river to rest for the night.")

def warm_tiers(engine):
    found = []
    for _ in range(2):
        found.append(run(engine, WARM, SamplingParams(max_new_tokens=1)))
        engine.flush_cache()
    return " then ".join(f"{r['host']} from host, {r['storage']} from storage" for r in found)

for e in (ref, eng):
    print(e.warmup(force=True, progress=False))
print("tiers warm-up:", warm_tiers(eng))
conv = Conversation(system)"""),
md("## Turns 1 and 2: computed, then found on the device"),
code("""conv.turn(eng)  # turn 1
conv.turn(eng)  # turn 2
conv.show(1); conv.show(2)"""),
md("""## Turn 3: the device tree is flushed, the prefix comes back from host

`flush_cache()` waits for the copies in flight, then evicts every cached device page no request holds; the
host and storage tiers keep theirs."""),
code("""n = eng.flush_cache()
conv.turn(eng)  # turn 3
st = eng.stats()
print(f"flush: {n} pages evicted from the device tree; host {st.host_slots_used}/{st.host_slots} slots, "
      f"storage {st.storage_slots_used}/{st.storage_slots} slots used")
conv.show(3)"""),
md("""## Turn 4: a new engine on the same storage directory

`close()` waits for the copies in flight and closes the storage tier (its index is on disk); then another
engine may open the directory (a second one while one holds it is refused at start-up). The new engine's
device tree and host tier are empty, so turn 4's prefix comes from storage (file -> host -> device): the
pages of turn 3's prompt and of its answer, which `decode_offload` committed while it was decoded. The new
engine is warmed up like the first (its tier warm-up finds the short prompt in storage)."""),
code("""eng.close()
eng2 = Engine(ckpt, cfg.engine, dtype, cache=tiered)
st = eng2.stats()
print(f"new engine: device tree {st.pages_cached} pages, host {st.host_slots_used} slots, "
      f"storage {st.storage_slots_used}/{st.storage_slots} slots (read back from the index on disk)")
try:
    Engine(ckpt, cfg.engine, dtype, cache=tiered)
except Exception as e:
    print("another engine on the same directory:", type(e).__name__, "-", e)
print(eng2.warmup(force=True, progress=False))
print("tiers warm-up:", warm_tiers(eng2))
conv.turn(eng2)  # turn 4
conv.show(4)
rows = conv.rows"""),
md("""## The same answers as without a cache

The prompts above are fed to the `cache=none` engine, which computes every token of every prompt. In the
table: where each prompt's tokens were found (whole pages of 16 tokens; the rest is computed), the time to
first token with the tiers and without a cache (on a shared CPU these vary from run to run), and the MiB each
turn copied between the tiers (one page, K and V of all 30 layers in float32, is 0.7 MiB)."""),
code("""plain = Conversation(system)
for _ in questions:
    plain.turn(ref)
plain = plain.rows
MB = 1 << 20
print(f"{'':>33}{'TTFT ms':>13}   {'MB copied':>25}")
print(f"{'turn':>4} {'prompt':>6} {'device':>6} {'host':>5} {'storage':>7} {'computed':>8} {'tiers':>6} {'none':>6}"
      f"   {'dev>host':>8} {'host>file':>9} {'file>host':>9} {'host>dev':>8}")
for t, (a, b) in enumerate(zip(plain, rows), 1):
    assert a["prompt"] == b["prompt"]
    assert a["tokens"] == b["tokens"], f"turn {t}: the tiers changed an answer"
    print(f"{t:>4} {b['prompt']:>6} {b['device']:>6} {b['host']:>5} {b['storage']:>7} {b['computed']:>8} "
          f"{b['ttft_ms']:>6.0f} {a['ttft_ms']:>6.0f}   {b['to_host'] / MB:>8.1f} {b['to_storage'] / MB:>9.1f}"
          f" {b['from_storage'] / MB:>9.1f} {b['from_host'] / MB:>8.1f}")
st = eng2.stats()
print(f"\\nevery answer equals cache=none's, token for token; storage now holds {st.storage_slots_used} pages, "
      f"the new engine's host {st.host_slots_used}\\n")
for t, r in enumerate(rows, 1):
    print(f"turn {t}: {r['text']!r}")"""),
md("## Where each turn's prefix was found, and its time to first token"),
code("""import io
import matplotlib
matplotlib.use("Agg")
from IPython.display import Image, display
import matplotlib.pyplot as plt
import numpy as np
turns = np.arange(1, len(rows) + 1)
fig, ax = plt.subplots(figsize=(8.5, 3.5))
bottom = np.zeros(len(rows))
for key, color in (("device", "tab:green"), ("host", "tab:blue"), ("storage", "tab:purple"), ("computed", "tab:gray")):
    vals = np.array([r[key] for r in rows])
    ax.bar(turns, vals, bottom=bottom, color=color, label=key, width=0.6)
    bottom += vals
ax.set_xticks(turns, [f"turn {t}" for t in turns]); ax.set_ylabel("prompt tokens")
ax2 = ax.twinx()
ax2.plot(turns, [r["ttft_ms"] for r in rows], "o-", color="black", label="TTFT, tiers")
ax2.plot(turns, [r["ttft_ms"] for r in plain], "o--", color="tab:red", label="TTFT, cache=none")
ax2.set_ylabel("TTFT (ms)"); ax2.set_ylim(0, None)
h1, l1 = ax.get_legend_handles_labels(); h2, l2 = ax2.get_legend_handles_labels()
ax.legend(h1 + h2, l1 + l2, loc="upper left", bbox_to_anchor=(1.12, 1), fontsize=8)
ax.set_title("Prompt tokens by where they were found; time to first token")
fig.tight_layout()
buf = io.BytesIO(); fig.savefig(buf, format="png", dpi=100); plt.close(fig)
display(Image(buf.getvalue()))  # (with the Agg backend plt.show() shows nothing in a notebook)
eng2.close()
st = eng2.stats()
assert st.copies_inflight == 0
eng2.flush_cache()
assert eng2.stats().pages_free == eng2.stats().pages_usable
store.cleanup()"""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/kv_tiers.ipynb")
