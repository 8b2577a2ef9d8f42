"""``python -m toolkit.bench.serve`` against a real unified server on loopback."""

import json

import pytest

from toolkit.bench import core

from tests.bench import run_bench
from tests.disagg.procs import Worker

pytestmark = pytest.mark.timeout(300)


def test_load_generator_multirun_over_workloads(tmp_path):
    """Guards against the load generator needing a model config (it composes none), losing
    requests on either workload, or a multirun writing fewer JSON files than jobs."""
    server = Worker("unified")
    try:
        out = run_bench("serve", "-m", "bench.workload=random,multiturn", f"bench.url={server.url}",
                        "bench.num_requests=8", "bench.concurrency=2", "bench.input_len=6", "bench.output_len=5",
                        "bench.turns=2", "bench.shared_prefix_len=10", "bench.logprobs=true",
                        f"bench.json_out={tmp_path}/load.json",
                        f"hydra.sweep.dir={tmp_path}/sweep")
    finally:
        server.stop()
    for job, workload in enumerate(("random", "multiturn")):
        doc = json.loads((tmp_path / f"load-{job}.json").read_text())
        (row,) = doc["rows"]
        assert row["workload"] == workload and row["requests"] == 8 and row["failed"] == 0, doc
        assert row["output_tok_per_s"] > 0 and doc["card"]["model"] == "tiny-random"
        # logprobs: a chunk per token, even those with no text (the byte model's partial UTF-8)
        assert row["tpot_avg_ms"] > 0 and row["ttft_p50_ms"] > 0 and row["itl_avg_ms"] > 0
    (last,) = core.parse_table(out)
    assert last["workload"] == "multiturn"


def test_tpot_counts_tokens_not_chunks():
    """Guards against per-token latency measured between streamed chunks: a chunk can carry
    several tokens (none is sent for a token that decodes to no text yet, e.g. part of a
    UTF-8 character, frequent with a byte-level random model), so chunk gaps overstate it."""
    from toolkit.bench.config import ServeBench
    from toolkit.bench.serve import Result, summarize

    # 11 tokens in 4 chunks: first at 0.1 s, then 3 chunks over 1.0 s
    r = Result(ok=True, ttft=0.1, itls=[0.2, 0.3, 0.5], e2e=1.1, out_tokens=11)
    assert r.tpot == pytest.approx(0.1)
    assert Result(ok=True, ttft=0.1, e2e=0.1, out_tokens=1).tpot is None
    s = summarize([r], wall=1.1, cfg=ServeBench())
    assert s["tpot_avg_ms"] == pytest.approx(100.0) and s["itl_avg_ms"] == pytest.approx(1000 / 3)
