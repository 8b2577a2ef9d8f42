"""``python -m toolkit.bench.attention bench.quick=true`` on CPU."""

from toolkit.bench import core

from tests.bench import run_bench


def test_attention_quick_has_every_case_against_its_ceiling():
    """Guards against the attention bench dropping a case (ceilings, decode, prefill from
    pages, ragged prefill, KV movement) or a kernel disagreeing with its reference."""
    rows = core.parse_table(run_bench("attention", "bench.quick=true"))
    cases = [r["case"] for r in rows]
    assert cases[:2] == ["ceiling", "ceiling"]
    for case in ("decode B=2 ctx=64", "prefill T=128", "prefill ragged 8 chunks T=200", "write_kv T=16",
                 "gather 8 pages x 2 layers", "scatter 8 pages x 2 layers"):
        assert case in cases, cases
    impls = {(r["case"], r["implementation"].split(" (")[0]) for r in rows}
    assert ("decode B=2 ctx=64", "ours, Pallas") in impls and ("decode B=2 ctx=64", "jnp reference") in impls
    assert not any("MISMATCH" in r["implementation"] or "FAILED" in r["implementation"] for r in rows), rows
    assert all(float(r["ms"]) > 0 for r in rows)
