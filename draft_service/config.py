from __future__ import annotations

from dataclasses import dataclass

from draft_service.feature_drafter import MAX_CATCH_UP
from specdec.config import batch_invariant_option, compile_option, cpu_kernels_option, gguf_blocks_option, option
from specdec.eagle import DRAFT_MATMUL_DTYPE, MATMUL_DTYPES
from specdec.ngram import HYBRID_MIN_NGRAM


@dataclass(frozen=True)
class DraftConfig:
    model: str = option("ngram", "'ngram' (prompt lookup, no model), a feature drafter folder (specdec train-draft), "
                        "or a draft model: HF folder, hub id, .gguf file")
    hybrid_ngram: int = option(HYBRID_MIN_NGRAM, "feature drafter: where the context repeats its last N or more "
                               "tokens, propose what followed them (prompt lookup): a chain is that copy, a tree "
                               "takes it as its leading branch beside the head's guesses (0 = never)")
    tree_expand: int = option(0, "feature drafter, trees of drafts: nodes expanded per depth (0 = auto: 1 on CPU, where "
                              "a 4-row step of the head costs 1.5x a 1-row one, 4 on CUDA, where rows are nearly free)")
    tree_children: int = option(4, "feature drafter, trees of drafts: children drafted per expanded node")
    max_catch_up: int = option(MAX_CATCH_UP, "feature drafter: the most committed positions the head takes in at "
                               "once; a session further behind (a long prompt, a new replica) starts the head's "
                               "cache that many positions back and attends to nothing before them (0 = all). "
                               "Drafts only steer, so no output changes")
    matmul_dtype: str = option(DRAFT_MATMUL_DTYPE, "feature drafter: dtype of the head's matrix products (weights "
                               "held in it; norms, attention and the residual stay float32): "
                               f"{', '.join(MATMUL_DTYPES)} (q8_0, q4_1: the weights rounded into GGML's blocks, "
                               "read by the C product on a CPU; refused elsewhere). auto: q8_0 where the C product "
                               "reads blocks (a CPU with AVX-512 or F16C, --cpu-kernels not torch), else float16. "
                               "Drafts only steer, so no output changes")
    feature_target: str = option("", "a feature drafter's target model, whose embeddings it reads (default: the one "
                                 "it was trained for, from its config.json)")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(0, "port to listen on (0 picks a free one; the chosen address is printed as JSON)")
    unix_socket: str = option("", "also listen on this Unix domain socket (co-located coordinators skip TCP); "
                              "announced as \"unix\": \"unix:PATH\"")
    device: str = option("cpu", "torch device for a model drafter")
    dtype: str = option("float32", "weights dtype for a model drafter")
    compile: str = compile_option("a model drafter's")
    batch_invariant: bool = batch_invariant_option()
    gguf_blocks: bool = gguf_blocks_option()
    cpu_kernels: str = cpu_kernels_option(". A feature drafter's products of fewer than 64 rows run in the C "
                                          "kernel on its float16 (or float32) weights, and its norms and rotary "
                                          "embedding in C, under 'c' and 'auto' (float16 needs AVX-512 or F16C); "
                                          "drafts only steer, so no output changes")
    cache_bytes: int = option(1024**3, "bound on the KV caches held, in bytes (LRU eviction beyond)")
    max_k: int = option(32, "most tokens proposed in one Propose")
    batch_window_ms: float = option(1.0, "model drafter: how long the first Propose of a batch waits for others (ms)")
    max_batch: int = option(16, "model drafter: most sessions drafted in one forward pass")
    max_queued: int = option(256, "Propose calls waiting beyond this are refused with RESOURCE_EXHAUSTED")
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
    ngram_max: int = option(3, "n-gram drafter: longest suffix matched")
    ngram_min: int = option(1, "n-gram drafter: shortest suffix matched")
    ngram_vocab_size: int = option(0, "n-gram drafter: vocabulary size for token-id checks (0 = accept any id)")
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
