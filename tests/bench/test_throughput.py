"""``python -m toolkit.bench.throughput`` on CPU, as a Hydra multirun."""

import json

from toolkit.bench import core

from tests.bench import run_bench


def test_throughput_multirun_writes_one_json_per_run(tmp_path):
    """Guards against the throughput bench losing a batch size or its compile count, and
    against a multirun (-m) writing one JSON over the other (one file per job)."""
    out = run_bench("throughput", "-m", "engine.overlap_schedule=true,false", "model=tiny-random",
                    "engine.attention_backend=reference", "bench.batch_sizes=[1,2]", "bench.prompt_len=16",
                    "bench.decode_steps=4", "bench.repeats=1", f"bench.json_out={tmp_path}/tp.json",
                    f"hydra.sweep.dir={tmp_path}/sweep")
    for job in (0, 1):
        doc = json.loads((tmp_path / f"tp-{job}.json").read_text())
        assert [r["batch"] for r in doc["rows"]] == [1, 2]
        assert all(r["decode_tok_s"] > 0 and r["compilations"] >= 1 for r in doc["rows"])
        assert doc["card"]["device"] and doc["card"]["jax"]
        assert doc["config"]["engine"]["overlap_schedule"] is (job == 0)  # the job's own config
    assert [r["batch"] for r in core.parse_table(out)] == ["1", "2"]  # the last job's table
