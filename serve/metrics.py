"""Prometheus metrics of a server (one registry per app, so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.queue = Gauge("queue_length", "requests admitted but not yet producing tokens", registry=r)
        self.running = Gauge("running_requests", "requests producing tokens", registry=r)
        self.pages = Gauge("kv_pages_in_use", "KV pages allocated", registry=r)
        self.engine_running = Gauge("engine_running_requests", "requests in the engine's running batch "
                                    "(on a decode worker: the decode batch)", registry=r)
        self.ttft = Histogram("time_to_first_token_seconds", "TTFT", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("inter_token_latency_seconds", "time between streamed tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.transfer_bytes = Gauge("kv_transfer_bytes", "KV bytes written to decode workers", registry=r)
        self.transfer_failures = Gauge("kv_transfer_failures", "failed KV transfers", registry=r)
        # a compilation while serving stalls every request of the worker: watch these
        self.compilations = Gauge("step_compilations", "executables of the engine's jitted step", registry=r)
        self.compile_seconds = Gauge("step_compile_seconds", "host seconds spent compiling the step",
                                     registry=r)
        self.step_shapes = Gauge("step_shapes", "shapes in the engine's bucket set (what warm-up compiles)",
                                 registry=r)
        self.warmed_up = Gauge("warmed_up", "1 once every shape of the bucket set is compiled", registry=r)
        self.xla_compiled = Gauge("xla_compilations", "XLA compilations in this process", registry=r)
        self.xla_loaded = Gauge("xla_cache_loads", "executables loaded from the persistent compile cache",
                                registry=r)
        self.cache_hit_tokens = Gauge("prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                      registry=r)
        self.cache_pages = Gauge("prefix_cache_pages", "KV pages in the prefix cache's tree", registry=r)
        self.cache_evictable = Gauge("prefix_cache_evictable_pages", "cached pages no request holds", registry=r)
        self.cache_locked = Gauge("prefix_cache_locked_pages", "cached pages requests hold", registry=r)
        self.cache_evicted = Gauge("prefix_cache_evicted_pages", "cached pages evicted to make room, so far",
                                   registry=r)
        self.state_slots = Gauge("state_slots", "recurrent-state slots of a hybrid model (0 without state)",
                                 registry=r)
        self.state_slots_used = Gauge("state_slots_in_use", "state slots held by requests and rooms", registry=r)
        self.pages_held = Gauge("kv_pages_held", "pages of failed transfers held until the peer cannot "
                                "write them", registry=r)
        # the tiers below the prefix cache (cache.host_pages, cache.storage)
        g = lambda name, doc: Gauge(name, doc, registry=r)  # noqa: E731
        self.tier = {
            "host_hit_tokens": g("kv_host_hit_tokens", "prompt tokens loaded back from the host tier"),
            "storage_hit_tokens": g("kv_storage_hit_tokens", "prompt tokens loaded back from storage"),
            "offloaded_bytes_host": g("kv_offloaded_bytes_host", "KV bytes copied device -> host"),
            "offloaded_bytes_storage": g("kv_offloaded_bytes_storage", "KV bytes written host -> storage"),
            "loaded_bytes_host": g("kv_loaded_bytes_host", "KV bytes loaded host -> device"),
            "loaded_bytes_storage": g("kv_loaded_bytes_storage", "KV bytes read storage -> host"),
            "copies_inflight": g("kv_copies_inflight", "tier copies in flight (their pages pinned)"),
            "host_slots": g("kv_host_slots", "pages the host tier holds at most"),
            "host_slots_used": g("kv_host_slots_used", "host tier slots in use"),
            "storage_slots": g("kv_storage_slots", "pages the storage tier holds at most (0: off)"),
            "storage_slots_used": g("kv_storage_slots_used", "storage tier slots in use"),
        }
        self.step_loaded = Gauge("step_executables_loaded",
                                 "step shapes warm-up loaded serialized (not traced, lowered or compiled)",
                                 registry=r)

    def set_engine(self, stats) -> None:
        """The gauges an engine's ``EngineStats`` feeds (every role has one)."""
        self.pages.set(stats.pages_used)
        self.engine_running.set(stats.running)
        self.compilations.set(stats.num_compilations)
        self.compile_seconds.set(stats.compile_seconds)
        self.step_shapes.set(stats.max_compilations)
        self.warmed_up.set(int(stats.warmed_up))
        self.xla_compiled.set(stats.xla_compiled)
        self.xla_loaded.set(stats.xla_loaded)
        self.step_loaded.set(stats.step_loaded)
        self.cache_hit_tokens.set(stats.cached_tokens)
        self.cache_pages.set(stats.pages_cached)
        self.cache_evictable.set(stats.pages_evictable)
        self.cache_locked.set(stats.pages_cached - stats.pages_evictable)
        self.cache_evicted.set(stats.pages_evicted)
        self.pages_held.set(stats.pages_held)
        self.state_slots.set(stats.state_slots)
        self.state_slots_used.set(stats.state_slots - stats.state_slots_free)
        for name, gauge in self.tier.items():
            gauge.set(getattr(stats, name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def unlabelled_samples(text: str) -> dict[str, float]:
    """The samples without labels of a /metrics page (what benchmarks and tests read)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out
