"""``python -m toolkit.bench.startup`` on CPU: both modes, as their command lines."""

import json

from toolkit.bench import core

from tests.bench import run_bench
from tests.disagg.procs import free_port

TINY = ["engine.shape_buckets=compact", "engine.max_model_len=64", "engine.chunk_size=16",
        "engine.max_batch_size=8", "engine.max_prefill_seqs=2"]


def test_compile_mode_one_row_per_shape(tmp_path):
    """Guards against the compile breakdown losing a shape of the bucket set, or counting
    cache loads on an empty cache."""
    out = run_bench("startup", "bench.mode=compile", *TINY, "engine.compile_threads=1",
                    f"engine.compile_cache_dir={tmp_path}/xla",
                    f"bench.json_out={tmp_path}/c.json")
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    shapes, total = rows[:-1], rows[-1]
    assert len(shapes) == 4 and total["shape"] == "all 4"  # decode {8} greedy and sampling, prefill {8, 16}
    assert all(r["seconds"] > 0 and r["xla_s"] > 0 and r["loaded"] == 0 for r in shapes)
    assert len(core.parse_table(out)) == 5


def test_serve_mode_warm_start_loads_everything(tmp_path):
    """Guards against the start-up benchmark reporting a warm start that compiled, or a
    load that compiled after ready, as if it had not."""
    args = ",".join(f"'{a}'" for a in ["model=tiny-random", "engine.warmup=true", *TINY])
    run_bench("startup", "bench.mode=serve", f"bench.server_args=[{args}]", f"bench.port={free_port()}",
              f"bench.cache_dir={tmp_path}/xla",
              "bench.load.num_requests=4", "bench.load.concurrency=2", "bench.load.output_len=4",
              "bench.load.input_len=4", "bench.load_concurrency=[1,2]", f"bench.json_out={tmp_path}/s.json")
    cold, warm, *loads = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert cold["step_shapes"] == warm["step_shapes"] == 4
    assert cold["xla_compiled"] >= 4 and cold["xla_loaded"] == 0 and cold["step_loaded"] == 0
    # warm: the step's shapes from the engine's store, the rest (small jits) from JAX's cache
    assert warm["xla_compiled"] == 0 and warm["step_loaded"] == 4
    assert warm["xla_loaded"] == cold["xla_compiled"] - 4
    assert [r["concurrency"] for r in loads] == [1, 2]
    for r in loads:
        assert r["load_compilations"] == 0 and r["requests"] == 4 and r["failed"] == 0, r
