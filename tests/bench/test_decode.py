"""The end-to-end decode benchmark's CPU smoke run (its GPU numbers are in kernels/NOTES.md)."""

from toolkit.bench import core

from tests.bench import run_bench


def test_bench_decode_small_runs_both_modes():
    """Guards the bench's own checks (full batch while timed, no request finishing, every page
    back, replays of the recorded step in both engine modes) against engine changes."""
    out = run_bench("decode", "bench.quick=true", "bench.batch_sizes=[1,2]", "bench.steps=4",
                    "bench.backends=[reference]", "bench.trace_steps=2")
    rows = [r for r in core.parse_table(out) if r["backend"] == "reference"]
    assert [(r["mode"], r["batch"]) for r in rows] == [("overlap", "1"), ("overlap", "2"), ("lockstep", "1"),
                                                       ("lockstep", "2")]
    assert all(r["new_compiles_while_timed"] == "0" for r in rows), out
    assert all(float(r["device_ms"]) > 0 and float(r["roofline_ms"]) > 0 for r in rows), out


def test_bench_decode_bamba_quick_roofline_has_state(capsys):
    """bench.model=bamba-9b on a tiny hybrid, in this process (a cold subprocess would import
    and compile for longer): the decode row's roofline includes the state read and written
    per step (and equals weights + K/V of the attention layers + state), and the prefill row
    of bench.prefill_len is printed before the decode table (the same step shape as the
    ctx-token prefill)."""
    import jax.numpy as jnp

    from toolkit.bench import config, decode
    from toolkit.models.spec import ModelArgs

    b = config.DecodeBench(model="bamba-9b", quick=True, batch_sizes=[1], ctx=32, steps=3, backends=["reference"],
                           modes=["overlap"], trace_steps=0, prefill_len=32, prefill_reps=1)
    decode.job(config.DecodeRun(bench=b))
    out = capsys.readouterr().out
    rows = core.parse_table(out)
    assert [(r["backend"], r["mode"], r["batch"]) for r in rows] == [("reference", "overlap", "1")], out
    r = rows[0]
    assert r["new_compiles_while_timed"] == "0" and float(r["device_ms"]) > 0, out
    assert 0 < float(r["state_roofline_ms"]) < float(r["roofline_ms"]), out
    pre = core.parse_table(out.split("Engine decode step")[0])
    assert [(p["prompt"], float(p["prefill_ms"]) > 0, float(p["tflop"]) >= 0) for p in pre] == [("32", True, True)]
    # the state bytes: per sequence and Mamba2 layer, conv [C, K-1] and SSM [H, P, N] float32, twice
    args = ModelArgs(**decode.SMALL_BAMBA)
    m = args.mamba
    conv = (m["num_heads"] * m["head_dim"] + 2 * m["n_groups"] * m["state_size"]) * (m["conv_kernel"] - 1) * 4
    ssm = m["num_heads"] * m["head_dim"] * m["state_size"] * 4
    assert decode.state_bytes(args, 3, jnp.dtype(jnp.float32).itemsize) == 2 * 3 * args.num_mamba_layers * (conv + ssm)
    # the Llama shape has no state term, and its KV counts every layer
    assert decode.state_bytes(ModelArgs(**decode.SMALL), 3, 4) == 0
