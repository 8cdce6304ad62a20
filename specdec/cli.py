"""The `specdec` command line: `up` starts the pipeline, `generate` streams an answer,
`demo` does both on the embedded defaults."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

# Only what `specdec generate` needs is imported here: the client side stays free of torch.
from specdec.client import SpecdecClient, is_rpc_error
from specdec.config import default_prompts_file

DEFAULT_MODEL = "smollm2"  # specdec.models.DEFAULT_MODEL, without importing torch for it


def _launch_options(args: argparse.Namespace):
    from specdec.launcher import LaunchOptions, drafter_in_target

    return LaunchOptions(
        target=args.target,
        draft=args.draft,
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        draft_replicas=args.draft_replicas,
        target_replicas=args.target_replicas,
        device=args.device,
        draft_device=args.draft_device,
        default_k=args.default_k,
        torch_threads=args.torch_threads,
        compile=args.compile,
        batch_invariant=not args.no_batch_invariant,
        snapshots=not args.no_kv_snapshots,
        tier_token_file=args.tier_token_file,
        unix_sockets=not args.tcp_tiers,
        coordinator_flags=("--tree-nodes", str(args.tree_nodes)) if args.tree_nodes is not None else (),
        draft_in_target=drafter_in_target(args.draft_placement, args.draft, args.target),
    )


def _stop_on_signal() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, installed before anything is started or announced, so
    a signal that comes early still stops what was started."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def cmd_up(args: argparse.Namespace) -> int:
    from specdec.launcher import launch

    stop = _stop_on_signal()
    try:
        pipeline = await launch(_launch_options(args))
    except RuntimeError as exc:  # (a setting refused, a service that did not start)
        print(f"specdec up: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(pipeline.summary()), flush=True)
    try:
        await stop.wait()
    finally:
        await pipeline.stop()
    return 0


async def stream_generate(client: SpecdecClient, echo: bool, prompt: str = "", **fields) -> dict:
    """Call Generate and collect the stream; with echo, write text to stdout as it arrives."""
    result = {"session_id": "", "prompt_token_ids": [], "token_ids": [], "text": "", "finish_reason": "", "stats": {}}
    async for piece in client.generate(prompt, **fields):
        result["session_id"] = piece.session_id
        if piece.prompt_token_ids:
            result["prompt_token_ids"] = piece.prompt_token_ids
        result["token_ids"] += piece.token_ids
        result["text"] += piece.text
        if echo and piece.text:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        if piece.stats is not None:
            result["finish_reason"], result["stats"] = piece.finish_reason, piece.stats
    return result


def format_stats(stats: dict, finish_reason: str) -> str:
    per_position = " ".join(
        f"{a}/{p}" for a, p in zip(stats.get("accepted_per_position", []), stats.get("proposed_per_position", []))
    )
    ks = stats.get("k_per_round", [])
    chosen = f", k per round {min(ks)}-{max(ks)} (mean {sum(ks) / len(ks):.1f})" if ks else ""
    return (
        f"finish: {finish_reason} | {stats.get('generated_tokens', 0)} tokens in {stats.get('rounds', 0)} target steps "
        f"(mean accepted length {stats.get('mean_accepted_length', 0):.2f}) | drafter {stats.get('drafter')} "
        f"k<={stats.get('k')}{chosen}, {stats.get('sampling_rule')}: "
        f"{stats.get('accepted_tokens', 0)}/{stats.get('draft_tokens', 0)} accepted "
        f"({100 * stats.get('acceptance_rate', 0):.1f}%), per position {per_position or '-'}\n"
        f"time {stats.get('total_s', 0):.2f}s: draft {stats.get('draft_s', 0):.2f}s, verify {stats.get('verify_s', 0):.2f}s, "
        f"network+coordinator {stats.get('network_coordinator_s', 0):.2f}s, redis {stats.get('redis_s', 0):.3f}s | "
        f"prefill {stats.get('target_prefill_tokens', 0)} tokens, reused {stats.get('target_reused_tokens', 0)} from cache"
        + (f" | {stats['draft_fallback_rounds']} rounds without draft (draft tier failing)" if stats.get("draft_fallback_rounds") else "")
    )


def _fields(args: argparse.Namespace) -> dict:
    return dict(session_id=args.session or "", raw=args.raw, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, k=args.k,
                fixed_k=args.fixed_k, stop=args.stop or [], ignore_eos=args.ignore_eos,
                sampling_rule=args.sampling_rule)


async def cmd_generate(args: argparse.Namespace) -> int:
    try:
        async with SpecdecClient(args.server, args.api_key, args.tls_ca, args.tls_cert, args.tls_key) as client:
            result = await stream_generate(client, not args.json, args.prompt, **_fields(args))
    except Exception as err:  # noqa: BLE001 - an RPC error or a certificate file that cannot be read
        if is_rpc_error(err):
            print(f"specdec generate: {err.code().name}: {err.details()}", file=sys.stderr)
        else:
            print(f"specdec generate: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print()
        print(f"[session {result['session_id']}]", file=sys.stderr)
        print(format_stats(result["stats"], result["finish_reason"]), file=sys.stderr)
    return 0


def demo_prompt(path: Path) -> str:
    """The first summarization prompt of the Spec-Bench file (or a built-in one without it)."""
    if path.is_file():
        for line in path.read_text().splitlines():
            item = json.loads(line)
            if item.get("category") == "summarization":
                return item["turns"][0]
    return (
        "Summarize in two sentences: Speculative decoding lets a small draft model propose several tokens that a "
        "large target model then checks in a single forward pass, keeping the target's exact output."
    )


async def cmd_demo(args: argparse.Namespace) -> int:
    from specdec.launcher import launch

    prompt = demo_prompt(Path(args.prompts))
    print(f"starting the pipeline (target {args.target}, drafter {args.draft}); the first run converts the model...",
          file=sys.stderr)
    try:
        pipeline = await launch(_launch_options(args))
    except RuntimeError as exc:
        print(f"specdec demo: {exc}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(pipeline.summary()), file=sys.stderr)
        print(f"\n--- prompt (summarization, Spec-Bench) ---\n{prompt[:400]}{'...' if len(prompt) > 400 else ''}\n"
              "--- answer ---", file=sys.stderr)
        async with SpecdecClient(pipeline.coordinator.address) as client:
            result = await stream_generate(client, True, prompt, max_new_tokens=args.max_new_tokens)
        print("\n--- stats ---", file=sys.stderr)
        print(format_stats(result["stats"], result["finish_reason"]), file=sys.stderr)
    finally:
        await pipeline.stop()
    return 0


async def cmd_bench(args: argparse.Namespace) -> int:
    from bench import report as bench_report
    from bench.harness import BenchOptions, run_bench

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip())

    out = Path(args.out or f"bench/out/{time.strftime('%Y%m%d-%H%M%S')}")
    options = BenchOptions(
        prompts=Path(args.prompts), limit=args.limit,
        categories=tuple(c.strip() for c in args.categories.split(",") if c.strip()),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        sampling_rules=tuple(r.strip() for r in args.sampling_rules.split(",") if r.strip()),
        peer_ks=ints(args.peer_ks), adaptive=not args.no_adaptive,
        target=args.target, drafters=tuple(d.strip() for d in args.drafters.split(",") if d.strip()),
        ks=ints(args.ks), concurrency=ints(args.concurrency), sweep_tokens=args.sweep_tokens,
        sweep_only=args.sweep_only, peers=not args.no_peers, overhead=not args.no_overhead, device=args.device, out=out,
        progress=not args.no_progress, kv_snapshots=not args.no_kv_snapshots, compile=args.compile,
        batch_invariant=not args.no_batch_invariant,
    )
    report = await run_bench(options)
    for path in bench_report.write(report, out):
        print(path, file=sys.stderr)
    print(bench_report.markdown(report))
    return 0


def cmd_train_draft(args: argparse.Namespace) -> int:
    from specdec.train_draft import options_from, train

    train(options_from(args), log=lambda line: print(line, file=sys.stderr))
    print(args.out)
    return 0


def cmd_tier_token(args: argparse.Namespace) -> int:
    """Write a new random tier token to a file readable by its owner only, unless one is there."""
    from specdec.access import new_token, read_keys

    path = Path(args.path)
    if path.is_file() and read_keys([], str(path)):
        print(f"{path} already holds a tier token", file=sys.stderr)
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(new_token() + "\n")
    print(f"wrote a new tier token to {path}", file=sys.stderr)
    return 0


def cmd_derive_draft(args: argparse.Namespace) -> int:
    from specdec.models import derive_layer_draft

    print(derive_layer_draft(args.source, args.layers, Path(args.out)))
    return 0


def _add_runner_flags(parser: argparse.ArgumentParser) -> None:
    """How the target and model drafters run their forward pass (specdec.launcher.runner_flags)."""
    parser.add_argument("--compile", default="auto", choices=("on", "off", "auto"),
                        help="torch.compile the target and a model drafter (CUDA graphs on CUDA); auto: on for CUDA")
    parser.add_argument("--no-batch-invariant", action="store_true",
                        help="unpadded single-token steps (faster with F.linear products, not with oneDNN's); "
                             "seeded output may then change with batching or failover")


def _add_pipeline_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_MODEL, help="target model: HF folder, hub id, .gguf file, 'smollm2'")
    parser.add_argument("--draft", default="auto", help="'auto' (the feature drafter shipped for the default target, "
                        "else ngram), 'ngram' (a draft tier of prompt lookup), 'local-ngram' (prompt lookup inside "
                        "the coordinator, no draft tier), a feature drafter folder, or a draft model sharing the "
                        "target's tokenizer")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting a redis-server")
    parser.add_argument("--host", default="127.0.0.1", help="address the services listen on")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
    parser.add_argument("--draft-placement", default="auto", choices=("auto", "target", "tier"),
                        help="where a feature drafter runs: 'target' (the target replicas host it and draft each "
                             "round in the Verify before it; greedy and the coupled rule; no draft tier), 'tier' (its "
                             "own draft services, which --draft-replicas counts), 'auto' (target for a feature "
                             "drafter; model and n-gram drafters keep their tier)")
    parser.add_argument("--draft-replicas", type=int, default=1, help="draft service processes")
    parser.add_argument("--target-replicas", type=int, default=1, help="target service processes")
    parser.add_argument("--device", default="cpu", help="torch device of the target, e.g. cuda")
    parser.add_argument("--draft-device", default="cpu", help="torch device of a model drafter")
    parser.add_argument("--default-k", type=int, default=4, help="draft tokens per round when a request does not say")
    parser.add_argument("--tree-nodes", type=int, default=None,
                        help="with the feature drafter: draft trees of this many tokens (EAGLE-2), verified in one "
                             "pass; greedy and the coupled rule (default: the coordinator's, 7; 0: chains)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch threads per service (0 = default)")
    _add_runner_flags(parser)
    parser.add_argument("--no-kv-snapshots", action="store_true",
                        help="do not write KV-cache snapshots to Redis (a failed-over replica recomputes instead)")
    parser.add_argument("--tcp-tiers", action="store_true",
                        help="the coordinator reaches the tiers over TCP instead of Unix sockets")
    parser.add_argument("--tier-token-file", default="",
                        help="the token the coordinator sends to the tiers (default: a fresh random one per run); "
                             "give one to call the tiers yourself")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start Redis, draft, target and coordinator; print one JSON line when healthy")
    _add_pipeline_flags(up)
    up.set_defaults(run=cmd_up)

    gen = commands.add_parser("generate", help="stream an answer from a running coordinator")
    gen.add_argument("prompt", help="the user's text")
    gen.add_argument("--server", required=True, help="coordinator address host:port")
    gen.add_argument("--max-new-tokens", type=int, default=0, help="0 = the server's default")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--k", type=int, default=None,
                     help="the most draft tokens per round (0 = target only); each round's is chosen up to it")
    gen.add_argument("--fixed-k", action="store_true", help="draft exactly --k tokens every round")
    gen.add_argument("--sampling-rule", choices=["coupled", "rejection"], default=None,
                     help="how sampled rounds are decided (default: the coordinator's)")
    gen.add_argument("--tls-ca", default="", help="PEM CA the coordinator's certificate chains to (TLS)")
    gen.add_argument("--tls-cert", default="", help="PEM client certificate (mutual TLS)")
    gen.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    gen.add_argument("--session", default=None, help="continue this session (multi-turn)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--raw", action="store_true", help="send the prompt without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.add_argument("--api-key", default=os.environ.get("SPECDEC_API_KEY"),
                     help="API key for a coordinator that requires one [env SPECDEC_API_KEY]")
    gen.set_defaults(run=cmd_generate)

    demo = commands.add_parser("demo", help="start the pipeline on the defaults, answer a Spec-Bench prompt, stop")
    _add_pipeline_flags(demo)
    demo.add_argument("--prompts", default=str(default_prompts_file()), help="Spec-Bench style JSONL file")
    demo.add_argument("--max-new-tokens", type=int, default=128)
    demo.set_defaults(run=cmd_demo)

    bench = commands.add_parser("bench", help="Spec-Bench figures: our pipeline and the in-process peers, one run")
    bench.add_argument("--prompts", default=str(default_prompts_file()), help="Spec-Bench style JSONL file")
    bench.add_argument("--limit", type=int, default=1, help="prompts per category of the file")
    bench.add_argument("--categories", default="", help="comma-separated categories (default: all)")
    bench.add_argument("--max-new-tokens", type=int, default=64)
    bench.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (then outputs are compared)")
    bench.add_argument("--top-p", type=float, default=1.0)
    bench.add_argument("--sampling-rules", default="coupled",
                       help="sampled runs: comma-separated rules (coupled, rejection), one configuration each")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--target", default=DEFAULT_MODEL, help="target model")
    bench.add_argument("--drafters", default="auto,ngram",
                       help="comma-separated: 'auto' (the drafter shipped for the target), 'ngram', feature drafter "
                            "folders (PATH+ngramN: hybrid with N-token prompt lookup, +ngram0 the head alone; "
                            "+treeN: trees of N drafts, +tree0 chains; +float32, +bfloat16: the head's matrix products in that dtype; "
                            "+torch: on torch's products, not the C kernel; +target: hosted by the target, no draft "
                            "service), draft model paths")
    bench.add_argument("--ks", default="4", help="comma-separated draft lengths (a drafter's own: DRAFTER@k1/k2)")
    bench.add_argument("--peer-ks", default="", help="ks of the Hugging Face prompt-lookup peer (default: --ks)")
    bench.add_argument("--no-adaptive", action="store_true",
                       help="skip the adaptive-k configurations (each drafter, k chosen up to the largest of --ks)")
    bench.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated session counts for the sweep")
    bench.add_argument("--sweep-tokens", type=int, default=32, help="new tokens per session in the sweep")
    bench.add_argument("--sweep-only", action="store_true", help="run only the concurrency sweep")
    bench.add_argument("--no-peers", action="store_true", help="skip the in-process Hugging Face peers")
    bench.add_argument("--no-overhead", action="store_true", help="skip the per-round overhead probe")
    bench.add_argument("--device", default="cpu", help="torch device for every model")
    bench.add_argument("--no-kv-snapshots", action="store_true", help="run our pipeline without KV-cache snapshots")
    _add_runner_flags(bench)
    bench.add_argument("--out", default="", help="output folder (default bench/out/<time>)")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(run=cmd_bench)

    from specdec.train_draft import add_arguments as add_training_arguments

    train = commands.add_parser("train-draft", help="train a feature drafter (EAGLE-3) for a target, on data the "
                                "target writes itself")
    add_training_arguments(train)
    train.set_defaults(run=cmd_train_draft)

    token = commands.add_parser("tier-token", help="write a random tier token to a file (if it holds none yet)")
    token.add_argument("path", help="file to write; give it to the tiers and coordinators as --tier-token-file")
    token.set_defaults(run=cmd_tier_token)

    derive = commands.add_parser("derive-draft", help="write a draft model made of a model's first N layers")
    derive.add_argument("--source", default=DEFAULT_MODEL, help="model to cut")
    derive.add_argument("--layers", type=int, default=6, help="decoder layers to keep")
    derive.add_argument("--out", required=True, help="folder to write")
    derive.set_defaults(run=cmd_derive_draft)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not asyncio.iscoroutinefunction(args.run):
        return args.run(args)
    try:
        return asyncio.run(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
