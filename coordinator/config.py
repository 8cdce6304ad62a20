from __future__ import annotations

from dataclasses import dataclass

from specdec.config import option
from specdec.models import DEFAULT_MODEL


@dataclass(frozen=True)
class CoordinatorConfig:
    target: tuple[str, ...] = option(("127.0.0.1:50052",), "target replica addresses, comma-separated")
    draft: tuple[str, ...] = option((), "draft replica addresses, comma-separated (empty: target only), "
                                    "'local-ngram': prompt lookup inside the coordinator, without a draft tier, or "
                                    "'target': the drafter the target replicas host (their --drafter), each round's "
                                    "drafts made in the Verify before it")
    ngram_max: int = option(3, "local-ngram drafter: longest suffix matched")
    ngram_min: int = option(1, "local-ngram drafter: shortest suffix matched")
    redis_url: str = option("redis://127.0.0.1:6379/0", "Redis URL holding the sessions")
    tokenizer: str = option(DEFAULT_MODEL, "tokenizer to use (the target model's: folder, hub id, .gguf, 'smollm2')")
    api_keys: tuple[str, ...] = option((), "API keys accepted on Generate, GetSession and DeleteSession, "
                                       "comma-separated (empty: no auth)")
    api_keys_file: str = option("", "file with one API key per line (keeps keys out of the process list)")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(0, "port to listen on (0 picks a free one; the chosen address is printed as JSON)")
    default_k: int = option(6, "the most draft tokens per round when a request does not say; each round's k is "
                            "chosen up to it from measured acceptance and costs (adaptive k)")
    max_k: int = option(16, "largest k a request may ask for")
    draft_ahead: str = option("auto", "propose round r+1 while round r is verified, on the hypothesis that r keeps "
                              "all its drafts: 'on', 'off', or 'auto' (on for the n-gram drafter, whose drafting "
                              "costs nothing, off for drafters that share the target's processors)")
    tree_nodes: int = option(7, "tree drafting with a feature drafter: each round proposes up to this many drafts as a "
                             "tree (EAGLE-2's dynamic tree, at most k deep) and Verify scores them in one pass with "
                             "a tree attention mask; greedy and the coupled rule (the rejection rule and other "
                             "drafters draft chains). 0: chains of k drafts")
    min_draft_confidence: str = option("auto", "adaptive rounds ask the drafter to leave out drafts it thinks the target "
                                       "unlikely to keep: those whose confidence (its own probability of the draft's "
                                       "path) is below this. 'auto': each round's from the measured cost of a draft "
                                       "and the tokens a round yields a second (a draft kept with probability p pays "
                                       "when p >= its cost x that rate); a number in [0, 1]: that floor; 0: every "
                                       "draft up to k. Requests with fixed_k always get k drafts")
    tree_max_sessions: int = option(1, "draft trees only while the target's recent passes carry at most this many "
                                    "sessions; beyond, chains (under load a tree's extra rows cost every session)")
    default_sampling_rule: str = option("coupled", "how sampled rounds are decided when a request does not say: "
                                        "'coupled' (drafter-invariant: a seed gives the same tokens whatever the "
                                        "drafter, k or failures) or 'rejection' (Leviathan et al.)")
    default_max_new_tokens: int = option(256, "max_new_tokens when a request does not say")
    max_new_tokens_limit: int = option(8192, "largest max_new_tokens a request may ask for")
    max_prompt_chars: int = option(1_000_000, "longest prompt text accepted, in characters")
    max_active_sessions: int = option(64, "Generate calls served at once; more are refused with RESOURCE_EXHAUSTED")
    health_interval_s: float = option(2.0, "seconds between health checks of each draft and target replica")
    metrics_port: int = option(0, "port of the Prometheus /metrics endpoint (0 = a free one, -1 = off)")
    http_port: int = option(0, "port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                            "/v1/models) on the coordinator's host (0 = a free one, -1 = off)")
    session_lease_s: float = option(10.0, "a dead coordinator's session can be resumed this many seconds after "
                                    "its last commit")
    session_ttl_s: int = option(86_400, "seconds a session lives in Redis after its last commit")
    rpc_timeout_s: float = option(60.0, "deadline of each Verify call, in seconds")
    draft_timeout_s: float = option(10.0, "deadline of each Propose call; past it the round runs target-only")
    retry_attempts: int = option(4, "tries of each Verify in all, on the session's replica then the others")
    retry_backoff_s: float = option(0.05, "wait before the first Verify retry, doubled each retry (with jitter)")
    retry_max_backoff_s: float = option(1.0, "longest wait between Verify retries")
    draft_retry_attempts: int = option(2, "tries of each Propose in all, without waiting (then the round runs "
                                       "target-only)")
    redis_timeout_s: float = option(5.0, "deadline of each Redis call, in seconds")
    startup_timeout_s: float = option(300.0, "how long to wait for the tiers to answer at start-up")
    tls_cert: str = option("", "PEM certificate to serve TLS with (empty: plaintext)")
    tls_key: str = option("", "PEM private key of tls_cert")
    tls_client_ca: str = option("", "PEM CA that client certificates must chain to (mutual TLS)")
    tier_tls_ca: str = option("", "PEM CA that draft/target certificates chain to (TLS towards the tiers)")
    tier_tls_cert: str = option("", "PEM client certificate presented to the tiers (mutual TLS)")
    tier_tls_key: str = option("", "PEM private key of tier_tls_cert")
    tier_token: str = option("", "shared secret sent to the draft and target tiers ('authorization: Bearer'); "
                             "prefer the env variable or tier_token_file to the flag")
    tier_token_file: str = option("", "file holding the tier token (its first non-comment line)")
    drain_grace_s: float = option(30.0, "on SIGTERM: health turns NOT_SERVING, then calls in flight get this long "
                                  "to finish before the server stops")
    trace_exporter: str = option("none", "OpenTelemetry spans: 'none', 'console', or 'otlp' (to otlp_endpoint; needs "
                                 "opentelemetry-exporter-otlp-proto-grpc)")
    otlp_endpoint: str = option("", "OTLP/gRPC collector for trace_exporter otlp, e.g. http://collector:4317")
    log_level: str = option("INFO", "logging level")
    log_format: str = option("text", "'text' or 'json' (one object a line, with the session's digest on every line "
                             "about a session)")
