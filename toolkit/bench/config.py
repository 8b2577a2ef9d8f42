"""Typed configs of the benchmarks, registered in Hydra's ConfigStore.

Each benchmark has one primary config, ``conf/bench/<name>.yaml``, composing its schema
below (the defaults live here, once; the YAML holds only what differs). Every benchmark's
own options sit under ``bench.``; the throughput benchmark also composes ``model``,
``engine`` and ``cache`` like ``toolkit.run``. Common to all:

    bench.json_out   write the rows, the device card and the config as JSON ("" = none;
                     under ``-m`` one file per job: <stem>-<job number>.json, or
                     <name>.json in the job's Hydra output directory when unset)
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from toolkit.config.schema import CacheConfig, EngineConfig, ModelConfig


@dataclasses.dataclass
class ThroughputBench:
    """``python -m toolkit.bench.throughput``: prompt and decode tokens/s of a real model."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    prompt_len: int = 128
    decode_steps: int = 64
    warmup: int = 1
    repeats: int = 3
    json_out: str = ""


@dataclasses.dataclass
class AttentionBench:
    """``python -m toolkit.bench.attention``: our kernels against the ceilings and baselines."""

    quick: bool = False  # tiny shapes (a CPU smoke run)
    only: list[str] = field(default_factory=lambda: ["decode", "prefill", "movement"])
    sweep: bool = False  # also sweep our kernels' tile choices (GPU; its own table first)
    json_out: str = ""


@dataclasses.dataclass
class DecodeBench:
    """``python -m toolkit.bench.decode``: a Llama-3-8B-shaped (or Bamba-9B-shaped) engine's
    decode step against the memory roofline, per batch size, attention backend and engine
    mode; optionally the prefill of one long prompt against the matmul ceiling."""

    model: str = "llama3-8b"  # llama3-8b | bamba-9b (attention + Mamba2 layers: state in the roofline)
    quick: bool = False  # a tiny model shape of that family (a CPU smoke run)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 64])
    ctx: int = 1024  # prompt tokens of every request
    steps: int = 32  # timed decode steps
    backends: list[str] = field(default_factory=lambda: ["auto", "reference"])
    modes: list[str] = field(default_factory=lambda: ["overlap", "lockstep"])
    page_size: int = 16
    profile: bool = False  # cProfile the timed steps of the largest batch (to stderr)
    trace_steps: int = 8  # after the timed steps, trace this many with the JAX profiler (GPU)
    prefill_len: int = 0  # > 0: also time the prefill of one prompt this long (vs the matmul ceiling)
    prefill_reps: int = 3  # timed prefills (after one that compiles)
    json_out: str = ""


@dataclasses.dataclass
class TransferBench:
    """``python -m toolkit.bench.transfer``: KV page WRITEs through NIXL between two processes."""

    mib: float = 512  # bytes per transfer (all layers, K and V)
    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"
    pool_pages: int = 0  # pages per pool (0 = twice the pages transferred)
    src_device: int = 0  # index into jax.devices() (torch/cupy: CUDA ordinal)
    dst_device: int = 0
    alloc: str = "jax"  # jax (XLA's VMM memory) | torch | cupy (cudaMalloc)
    platform: str = ""  # JAX_PLATFORMS for the two processes (e.g. cpu: DRAM pools)
    patterns: list[str] = field(default_factory=lambda: ["random", "contig"])  # + rooms, staged
    rooms: int = 64  # concurrent writes of the rooms pattern
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    aux: bool = True  # send the aux record with the pages (the real two-stage write on VRAM)
    xfer_timeout_s: float = 120
    startup_timeout_s: float = 240
    env_variant: str = "default"  # label of the UCX_* environment in use (printed, stored)
    ucx_info: bool = True  # list the UCP resources of the initiator process
    ucx_threads: int = 0  # NIXL UCX backend worker threads (0: one worker, no split)
    split_batch: int = 0  # descriptors from which a write is split across them (0: NIXL's 1024)
    json_out: str = ""


@dataclasses.dataclass
class ServeBench:
    """``python -m toolkit.bench.serve``: replay a workload against any OpenAI-compatible
    endpoint (ours or another server); needs no model config."""

    url: str = "http://127.0.0.1:8000"
    model: str = ""  # "" = the first of /v1/models
    workload: str = "random"  # random | multiturn | shared_prefix
    num_requests: int = 64
    concurrency: int = 8
    input_len: int = 128  # random: prompt words; multiturn: words per user turn
    output_len: int = 64
    # ask for logprobs: the server then streams a chunk for every token, also one whose text
    # is empty (a random model's byte-level tokens are often partial UTF-8), so TTFT and ITL
    # are per token (at the cost of building the logprob objects)
    logprobs: bool = False
    turns: int = 4  # multiturn: user turns per conversation (shared, growing prefixes)
    shared_prefix_len: int = 256  # multiturn, shared_prefix: words of each shared prefix
    num_prefixes: int = 4  # shared_prefix: unique long prefixes the conversations start from
    seed: int = 0
    json_out: str = ""


@dataclasses.dataclass
class StartupBench:
    """``python -m toolkit.bench.startup``: warm-up per step shape (``compile``, this
    process), or a real server's time to ready, cold and warm compile cache (``serve``)."""

    mode: str = "compile"  # compile | serve
    # serve: the overrides of `python -m serve` (role, model, engine, ...); server.port and
    # engine.compile_cache_dir are set per run
    server_args: list[str] = field(default_factory=lambda: ["model=tiny-random"])
    cache_dir: str = ""  # serve: the compile cache of the runs ("" = a new temporary directory)
    port: int = 8321
    ready_timeout_s: float = 1800
    warm_runs: int = 1  # serve: restarts with the filled cache (the last one takes the load)
    # serve: the load against the last warm server (num_requests=0: none)
    load: ServeBench = field(default_factory=lambda: ServeBench(num_requests=0, input_len=64, output_len=128,
                                                                concurrency=64))
    # serve: run the load once per concurrency here, one row each ([] = load.concurrency only)
    load_concurrency: list[int] = field(default_factory=list)
    json_out: str = ""


@dataclasses.dataclass
class ThroughputRun:
    model: ModelConfig = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    bench: ThroughputBench = field(default_factory=ThroughputBench)


@dataclasses.dataclass
class StartupRun:
    model: ModelConfig = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)
    bench: StartupBench = field(default_factory=StartupBench)


@dataclasses.dataclass
class AttentionRun:
    bench: AttentionBench = field(default_factory=AttentionBench)


@dataclasses.dataclass
class DecodeRun:
    bench: DecodeBench = field(default_factory=DecodeBench)


@dataclasses.dataclass
class TransferRun:
    bench: TransferBench = field(default_factory=TransferBench)


@dataclasses.dataclass
class ServeRun:
    bench: ServeBench = field(default_factory=ServeBench)


SCHEMAS = {"throughput": ThroughputRun, "attention": AttentionRun, "decode": DecodeRun,
           "transfer": TransferRun, "serve": ServeRun, "startup": StartupRun}


def register() -> None:
    """Store each benchmark's schema as ``bench_<name>_schema`` (its primary config's first
    default), plus the model/engine/cache group schemas the throughput bench composes."""
    from toolkit.config import schema

    schema.register()
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=f"bench_{name}_schema", node=node)
