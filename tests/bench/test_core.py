"""The shared benchmark core: the timing loop, the table and where JSON goes."""

from toolkit.bench import core


def test_timing_loop_syncs_once_per_repetition():
    """Guards against a timing loop that waits after every call (it would time latency,
    not calls issued back to back as a serving loop issues them)."""
    calls, syncs = [], []
    times = core.time_calls(lambda: calls.append(1) or len(calls), sync=syncs.append, warmup=2, iters=5, reps=3)
    assert len(times) == 3 and len(calls) == 2 + 5 * 3
    assert syncs == [1, 2, 7, 12, 17]  # each warm-up call, then the last call of each repetition


def test_table_round_trips_text_with_spaces_and_the_table_comes_last(capsys):
    """Guards against the printed table losing cells with spaces (implementation names) or
    anything printed after it (scripts and tests read the last table on stdout)."""
    rows = [{"case": "decode B=2 ctx=64", "impl": "ours, Pallas (err 3.0e-03)", "ms": 0.25, "n": 3},
            {"case": "ceiling", "impl": "bf16 matmul", "ms": 3.0, "n": 0}]
    core.report("t", rows, ["case", "impl", "ms", "n"], card={"device": "cpu"}, title="title", notes=("a note",))
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("|")
    assert core.parse_table(out) == [{"case": "decode B=2 ctx=64", "impl": "ours, Pallas (err 3.0e-03)",
                                      "ms": "0.250", "n": "3"}, {"case": "ceiling", "impl": "bf16 matmul",
                                                                  "ms": "3.000", "n": "0"}]


def test_json_path_outside_a_multirun_is_the_option():
    """Guards against a single run writing its JSON anywhere but bench.json_out (or nowhere)."""
    assert core.json_path("decode", "") == ""
    assert core.json_path("decode", "/tmp/x.json") == "/tmp/x.json"
