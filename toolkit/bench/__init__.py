"""Every benchmark, one command-line style (Hydra), one shared core (``core.py``).

    python -m toolkit.bench.throughput   prompt/decode tokens/s of a real model (engine groups)
    python -m toolkit.bench.decode       8B-shaped engine decode step against the memory roofline
    python -m toolkit.bench.attention    attention and KV-movement kernels against the ceilings
    python -m toolkit.bench.transfer     KV page WRITEs through NIXL between two processes
    python -m toolkit.bench.serve        load generator for any OpenAI-compatible endpoint

Options are ``bench.*`` (``toolkit/bench/config.py``); ``-m`` sweeps them (one JSON per run).
Results and the commands that produced them: ``docs/benchmarks.md``.
"""
