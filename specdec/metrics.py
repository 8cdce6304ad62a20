"""Prometheus metrics: one registry per server (no process-wide globals), served on HTTP /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """Every metric the three services export; each service updates the ones that concern it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_seconds = Histogram("specdec_rpc_duration_seconds", "Server-side duration of each RPC",
                                     ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.verify_batch_size = Histogram("specdec_verify_batch_size", "Sessions per target forward pass",
                                           buckets=BATCH_BUCKETS, registry=r)
        self.draft_batch_size = Histogram("specdec_draft_batch_size", "Sessions per drafting batch",
                                          buckets=BATCH_BUCKETS, registry=r)
        self.draft_tokens = Counter("specdec_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted_tokens = Counter("specdec_accepted_tokens", "Draft tokens accepted by the target", registry=r)
        self.rounds = Counter("specdec_rounds", "Decoding rounds (target steps)", registry=r)
        self.generated_tokens = Counter("specdec_generated_tokens", "Tokens streamed to clients", registry=r)
        self.draft_fallbacks = Counter("specdec_draft_fallback_rounds", "Rounds run target-only because drafting failed",
                                       registry=r)
        self.active_sessions = Gauge("specdec_active_sessions", "Generate calls in flight (coordinator) or "
                                     "sessions held in the cache (draft, target)", registry=r)
        self.cache_bytes = Gauge("specdec_cache_bytes", "Bytes of KV cache held", registry=r)
        self.cache_evictions = Counter("specdec_cache_evictions", "Sessions evicted from the cache", registry=r)
        self.time_to_first_token = Histogram("specdec_time_to_first_token_seconds",
                                             "Generate: from the call to its first generated token", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.inter_token_latency = Histogram("specdec_inter_token_latency_seconds",
                                             "Generate: time between streamed tokens (a message of n tokens after a gap "
                                             "g counts n times g/n)", buckets=LATENCY_BUCKETS, registry=r)
        self.snapshot_chunks = Counter("specdec_kv_snapshot_chunks", "KV snapshot chunks by outcome: written, "
                                       "dropped (write queue full), failed (Redis error), refused (bound, "
                                       "session gone)", ["outcome"], registry=r)
        self.snapshot_bytes = Counter("specdec_kv_snapshot_bytes", "KV snapshot bytes written to Redis", registry=r)
        self.snapshot_restores = Counter("specdec_kv_snapshot_restores", "Sessions restored from a KV snapshot",
                                         registry=r)
        self.snapshot_restored_tokens = Counter("specdec_kv_snapshot_restored_tokens",
                                                "Positions restored from KV snapshots instead of recomputed", registry=r)
        self.snapshot_restore_seconds = Histogram("specdec_kv_snapshot_restore_seconds",
                                                  "Time to fetch and rebuild a session's KV cache from Redis",
                                                  buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("specdec_rejected_requests", "Requests refused with RESOURCE_EXHAUSTED", registry=r)

    def watch_cache(self, table) -> None:
        """Export a SessionCacheTable's size; read on scrape from the values the worker last stored."""
        self.active_sessions.set_function(lambda: len(table))
        self.cache_bytes.set_function(lambda: table.bytes_held)
        table.on_evict = self.cache_evictions.inc

    def serve(self, host: str, port: int) -> str:
        """Start the /metrics HTTP server (a daemon thread); returns host:port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return f"{host}:{server.server_port}"
