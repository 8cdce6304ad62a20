from __future__ import annotations

from dataclasses import dataclass

from specdec.config import batch_invariant_option, compile_option, cpu_kernels_option, gguf_blocks_option, option
from specdec.models import DEFAULT_MODEL


@dataclass(frozen=True)
class TargetConfig:
    model: str = option(DEFAULT_MODEL, "target model: HF folder, hub id, .gguf file, or 'smollm2'")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(0, "port to listen on (0 picks a free one; the chosen address is printed as JSON)")
    unix_socket: str = option("", "also listen on this Unix domain socket (co-located coordinators skip TCP); "
                              "announced as \"unix\": \"unix:PATH\"")
    device: str = option("cpu", "torch device, e.g. cpu, cuda, cuda:1")
    dtype: str = option("float32", "weights dtype: float32, float16 or bfloat16")
    compile: str = compile_option("the target's")
    batch_invariant: bool = batch_invariant_option()
    gguf_blocks: bool = gguf_blocks_option()
    cpu_kernels: str = cpu_kernels_option()
    cache_bytes: int = option(2 * 1024**3, "bound on the KV caches held, in bytes (LRU eviction beyond)")
    drafter: str = option("", "a feature drafter to host: it drafts the next round in the pass that verifies this one "
                          "(coordinators with --draft target), from the features the pass leaves here; its folder, "
                          "or 'auto' for the one shipped for the model; empty: none")
    drafter_cache_bytes: int = option(256 * 1024**2, "bound on the hosted drafter's per-session state, in bytes (LRU "
                                      "eviction beyond; a session evicted takes the target's features in again)")
    max_k: int = option(32, "most draft tokens accepted in one Verify")
    batch_window_ms: float = option(1.0, "how long the first Verify of a batch waits for others (ms)")
    max_batch: int = option(16, "most sessions verified in one forward pass")
    max_queued: int = option(256, "Verify calls waiting beyond this are refused with RESOURCE_EXHAUSTED")
    redis_url: str = option("", "Redis holding the sessions, for KV-cache snapshots (empty: none); "
                            "rediss:// for TLS, redis://:PASSWORD@host for auth (prefer the env variable)")
    redis_timeout_s: float = option(5.0, "deadline of each Redis call for snapshots, in seconds")
    snapshot_max_session_bytes: int = option(256 * 1024**2, "bound on one session's KV snapshot in Redis, in bytes")
    snapshot_max_total_bytes: int = option(1024**3, "bound on all KV snapshots in Redis (both tiers), in bytes; "
                                           "past it the least recently written are deleted")
    snapshot_ttl_s: float = option(3600.0, "a KV snapshot is deleted this long after its last write (at most "
                                   "the session's own TTL)")
    snapshot_max_pending_bytes: int = option(256 * 1024**2, "bound on snapshot bytes waiting to be written; "
                                             "beyond it chunks are dropped and retried on a later round")
    snapshot_min_chunk_tokens: int = option(16, "committed positions gathered before a snapshot chunk is written")
    snapshot_min_restore_tokens: int = option(64, "sessions shorter than this are recomputed, not restored")
    metrics_port: int = option(0, "port of the Prometheus /metrics endpoint (0 = a free one, -1 = off)")
    torch_threads: int = option(0, "torch intra-op threads (0 = torch's default)")
    gil_switch_ms: float = option(5.0, "how long a Python thread may hold the GIL while another waits (Python's "
                                  "switch interval); lower lets the model thread take it back sooner from the "
                                  "gRPC event loop")
    tls_cert: str = option("", "PEM certificate to serve TLS with (empty: plaintext)")
    tls_key: str = option("", "PEM private key of tls_cert")
    tls_client_ca: str = option("", "PEM CA that client certificates must chain to (mutual TLS)")
    tier_token: str = option("", "shared secret the coordinators send ('authorization: Bearer'); other callers are "
                             "UNAUTHENTICATED. Prefer the env variable or tier_token_file to the flag")
    tier_token_file: str = option("", "file holding the tier token (first non-comment line; more lines: also "
                                  "accepted, for rotation)")
    allow_unauthenticated: bool = option(False, "serve callers that bring neither the tier token nor a client "
                                         "certificate (only on a private test network)")
    drain_grace_s: float = option(30.0, "on SIGTERM: health turns NOT_SERVING, then calls in flight get this long "
                                  "to finish before the server stops")
    trace_exporter: str = option("none", "OpenTelemetry spans: 'none', 'console', or 'otlp' (to otlp_endpoint; needs "
                                 "opentelemetry-exporter-otlp-proto-grpc)")
    otlp_endpoint: str = option("", "OTLP/gRPC collector for trace_exporter otlp, e.g. http://collector:4317")
    log_level: str = option("INFO", "logging level")
    log_format: str = option("text", "'text' or 'json' (one object a line, with the session's digest on every line "
                             "about a session)")
