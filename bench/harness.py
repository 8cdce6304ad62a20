"""`specdec bench`: Spec-Bench prompts through our pipeline and the in-process peers, one run.

Configurations, all on the same target model and prompts:
  ours-k0                 target-only decoding through our services: the baseline
  ours-<drafter>-k<k>     our speculative pipeline, for each drafter and each k
  hf-plain                Hugging Face generate(), in process
  hf-assisted-k<k>        generate(assistant_model=<draft model>), in process
  hf-lookup-k<k>          generate(prompt_lookup_num_tokens=k), in process
Every configuration sees the same prompt token ids (the chat template applied once, by us).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import grpc
import torch
from tqdm import tqdm

from bench.figures import SPEC_BENCH_COLUMNS, PromptRun, Totals, column_of, ideal_speedup, percentile
from specdec.eagle import MATMUL_DTYPES, is_drafter_folder
from specdec.config import default_prompts_file
from specdec.launcher import LaunchOptions, Pipeline, launch, runner_flags, spawn_service
from specdec.models import AUTO_DRAFTER, DRAFT_IN_TARGET, default_drafter
from specdec.ngram import LOCAL_NGRAM
from specdec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

BASELINE = "ours-k0"
HF_PLAIN = "hf-plain"


@dataclass
class BenchOptions:
    prompts: Path = field(default_factory=default_prompts_file)
    limit: int = 1  # prompts per category of the file
    categories: tuple[str, ...] = ()
    max_new_tokens: int = 64
    temperature: float = 0.0
    sampling_rules: tuple[str, ...] = ("coupled",)  # sampled runs: one configuration per rule
    peer_ks: tuple[int, ...] = ()  # ks of the Hugging Face prompt-lookup peer (default: ks)
    adaptive: bool = True  # also run each drafter with adaptive k (up to the largest of ks)
    top_p: float = 1.0
    seed: int = 0
    target: str = "smollm2"
    drafters: tuple[str, ...] = ("auto", "ngram")  # "auto", "ngram", drafter folders (PATH+ngramN), draft models
    ks: tuple[int, ...] = (4,)
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    sweep_tokens: int = 32
    sweep_only: bool = False  # only the concurrency sweep (no per-configuration runs, peers or probe)
    peers: bool = True
    overhead: bool = True  # the stand-in-model probe of per-round overhead (bench/overhead.py)
    device: str = "cpu"
    kv_snapshots: bool = True  # the tiers write KV-cache snapshots to Redis, as `specdec up` does
    compile: str = "auto"  # our target's and model drafters' --compile (on, off, auto = on for CUDA)
    batch_invariant: bool = True  # our target's and model drafters' --batch-invariant
    out: Path = Path("bench/out")
    progress: bool = True


@dataclass
class Prompt:
    question_id: object
    category: str
    text: str


def load_prompts(path: Path, limit: int, categories: Sequence[str]) -> list[Prompt]:
    """The first turn of the first `limit` prompts of each category (all categories if none given)."""
    taken: dict[str, int] = {}
    prompts = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        category = item["category"]
        if categories and category not in categories:
            continue
        if taken.get(category, 0) >= limit:
            continue
        taken[category] = taken.get(category, 0) + 1
        prompts.append(Prompt(item.get("question_id"), category, item["turns"][0]))
    if not prompts:
        raise ValueError(f"no prompts selected from {path} (categories={list(categories) or 'all'})")
    return prompts


@dataclass
class GreedyAnswer:
    category: str
    prompt: list[int]  # the chat template's tokens of the prompt, up to the answer
    answer: list[int]  # the target's greedy continuation


def greedy_answers(target: str, model, tokenizer, limit: int, max_new_tokens: int,
                   cache: Path | None = None, prompts: Path | None = None) -> list[GreedyAnswer]:
    """The target's greedy answers (Hugging Face `generate`) to the first `limit` prompts of each
    category of `prompts` (default: Spec-Bench's). With `cache`: read from that file when it holds
    answers made with the same settings, else made and written there (26 answers of 128 tokens
    take minutes on a CPU)."""
    from coordinator.prompting import turn_tokens

    prompts = Path(prompts or default_prompts_file())
    settings = {"target": target, "prompts": str(prompts), "limit": limit, "max_new_tokens": max_new_tokens}
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == settings:
            return [GreedyAnswer(**item) for item in saved["answers"]]
    answers = []
    for prompt in load_prompts(prompts, limit, ()):
        ids = turn_tokens(tokenizer, prompt.text, raw=False, history=(), eos_ids=())
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(GreedyAnswer(prompt.category, ids, out[0, len(ids):].tolist()))
    if cache is not None:
        cache.write_text(json.dumps({"settings": settings, "answers": [asdict(a) for a in answers]}))
    return answers


RULES = {"rejection": common_pb2.SAMPLING_RULE_REJECTION, "coupled": common_pb2.SAMPLING_RULE_COUPLED}


ADAPTIVE = -1  # a configuration's k: choose each round's k, up to the largest of --ks


def _request(prompt: Prompt, options: BenchOptions, k: int, prompt_ids: list[int] | None = None,
             rule: str | None = None):
    adaptive = k == ADAPTIVE
    request = coordinator_pb2.GenerateRequest(
        max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
        seed=options.seed, k=max(options.ks) if adaptive else k, fixed_k=not adaptive,
        sampling_rule=RULES[rule or options.sampling_rules[0]],
    )
    if prompt_ids is not None:
        request.prompt_token_ids.extend(prompt_ids)
    else:
        request.prompt = prompt.text
    return request


async def run_ours(stub, prompt: Prompt, options: BenchOptions, k: int, prompt_ids=None,
                   rule: str | None = None) -> tuple[PromptRun, list[int], list[float]]:
    """One generation through the coordinator: its PromptRun, prompt ids and per-token latencies."""
    started = last = time.perf_counter()
    tokens: list[int] = []
    ids: list[int] = []
    gaps: list[float] = []
    stats = None
    async for message in stub.Generate(_request(prompt, options, k, prompt_ids, rule)):
        now = time.perf_counter()
        if message.prompt_token_ids:
            ids = list(message.prompt_token_ids)
        if message.token_ids:
            # A message carrying n tokens after a gap g counts as n tokens of latency g/n each.
            gaps += [(now - last) / len(message.token_ids)] * len(message.token_ids)
            last = now
        tokens += message.token_ids
        if message.HasField("stats"):
            stats = message.stats
    wall = time.perf_counter() - started
    run = PromptRun(
        prompt.question_id, prompt.category, tokens, wall,
        rounds=stats.rounds, draft_tokens=stats.draft_tokens, accepted_tokens=stats.accepted_tokens,
        accepted_per_position=list(stats.accepted_per_position), proposed_per_position=list(stats.proposed_per_position),
        draft_s=stats.draft_s, verify_s=stats.verify_s, redis_s=stats.redis_s,
        network_coordinator_s=stats.network_coordinator_s, prefill_tokens=stats.target_prefill_tokens,
    )
    return run, ids, gaps


class HFPeers:
    """Hugging Face generate() in this process, on the same models and prompt ids."""

    def __init__(self, target: str, device: str):
        from specdec import models

        self.models = models
        self.device = device
        self.target = models.load_model(target, device=device)
        self.tokenizer = models.load_tokenizer(target)
        self.eos = models.eos_token_ids(self.target, self.tokenizer)
        self._drafts: dict[str, object] = {}

    def draft(self, spec: str):
        if spec not in self._drafts:
            self._drafts[spec] = self.models.load_model(spec, device=self.device)
        return self._drafts[spec]

    def generate(self, prompt: Prompt, ids: list[int], options: BenchOptions, **mode) -> PromptRun:
        sampling = {"do_sample": False}
        if options.temperature > 0:
            sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p, "top_k": 0}
            torch.manual_seed(options.seed)
        inputs = torch.tensor([ids], device=self.device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.target.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=options.max_new_tokens,
                eos_token_id=self.eos, pad_token_id=self.eos[0], **sampling, **mode,
            )
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        return PromptRun(prompt.question_id, prompt.category, out[0, len(ids):].tolist(), wall)


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory_gib"] = round(mem_kb / 1024**2, 1)
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


TORCH_PRODUCTS = "torch"  # a --drafters entry's suffix: the draft service on torch's products
IN_TARGET = "target"  # a --drafters entry's suffix: the drafter hosted by the target (--draft target)
FLOOR = "floor"  # a --drafters entry's suffix: the coordinator's --min-draft-confidence


@dataclass(frozen=True)
class DrafterSpec:
    """A --drafters entry, MODEL[+ngramN][+treeN][+DTYPE][+torch][+floorX][+target][@k1/k2]: 'auto' is the drafter
    shipped for the target, '+ngramN' a feature drafter in hybrid with N-token prompt lookup
    ('+ngram0': the head alone; by default the draft service's --hybrid-ngram), '+treeN' the
    coordinator asking it for trees of N drafts ('+tree0': chains), '+float32' (or another of
    MATMUL_DTYPES) the feature drafter's matrix products in that dtype, '+torch' the draft service
    on torch's products (--cpu-kernels torch), '+floorX' the coordinator's --min-draft-confidence X
    ('+floor0': every draft; by default 'auto'), '+target' the feature drafter hosted by the target
    replicas (their --drafter, the coordinator's --draft target: no draft service, each round's
    drafts made in the Verify before it), '@k1/k2' the ks to run it at."""

    model: str
    hybrid: str = ""
    tree: str = ""
    ks: tuple[int, ...] = ()
    matmul: str = ""
    torch_products: bool = False
    floor: str = ""
    in_target: bool = False

    @classmethod
    def parse(cls, spec: str) -> "DrafterSpec":
        head, _, ks = spec.partition("@")
        first, *rest = head.split("+")
        matmul = next((part for part in rest if part in MATMUL_DTYPES), "")
        floor = next((part.removeprefix(FLOOR) for part in rest if part.startswith(FLOOR)), "")
        head = "+".join([first] + [part for part in rest
                                   if part not in (*MATMUL_DTYPES, TORCH_PRODUCTS, IN_TARGET)
                                   and not part.startswith(FLOOR)])
        head, _, tree = head.partition("+tree")
        model, _, hybrid = head.partition("+ngram")
        return cls(model, hybrid, tree, tuple(int(k) for k in ks.split("/") if k), matmul, TORCH_PRODUCTS in rest,
                   floor, IN_TARGET in rest)


def drafter_ks(spec: str) -> tuple[int, ...]:
    """The ks a --drafters entry names after '@' (k1/k2/...), or () for --ks."""
    return DrafterSpec.parse(spec).ks


def coordinator_flags(spec: str) -> tuple[str, ...]:
    """The coordinator's flags for a --drafters entry: its tree size and confidence floor, if it names them."""
    parsed = DrafterSpec.parse(spec)
    return ((("--tree-nodes", str(int(parsed.tree))) if parsed.tree else ())
            + (("--min-draft-confidence", parsed.floor) if parsed.floor else ()))


def drafter_service(spec: str, target: str) -> tuple[str, tuple[str, ...]]:
    """A --drafters entry as a draft service's model and flags."""
    parsed = DrafterSpec.parse(spec)
    model = default_drafter(target) if parsed.model == AUTO_DRAFTER else parsed.model
    return model, ((("--hybrid-ngram", parsed.hybrid) if parsed.hybrid else ())
                   + (("--matmul-dtype", parsed.matmul) if parsed.matmul else ())
                   + (("--cpu-kernels", "torch") if parsed.torch_products else ()))


def hosted_drafter(drafters: Sequence[str], target: str) -> str:
    """The drafter the target hosts for the --drafters entries that name '+target' ('' if none)."""
    hosted = {drafter_service(d, target)[0] for d in drafters if DrafterSpec.parse(d).in_target}
    if len(hosted) > 1:
        raise ValueError(f"one drafter can be hosted by the target, not {len(hosted)}: {sorted(hosted)}")
    return hosted.pop() if hosted else ""


async def _start_pipelines(options: BenchOptions) -> tuple[Pipeline, dict[str, str]]:
    """One target, and per drafter a draft service (none for one the target hosts) and a
    coordinator on that target."""
    first, *others = options.drafters
    model, flags = drafter_service(first, options.target)
    hosted = hosted_drafter(options.drafters, options.target)
    pipeline = await launch(LaunchOptions(target=options.target, draft=model, device=options.device,
                                          draft_device=options.device, snapshots=options.kv_snapshots,
                                          draft_flags=flags, compile=options.compile,
                                          batch_invariant=options.batch_invariant,
                                          coordinator_flags=coordinator_flags(first),
                                          draft_in_target=DrafterSpec.parse(first).in_target,
                                          target_drafter=hosted))
    coordinators = {first: pipeline.coordinator.address}
    targets = ",".join(c.address for c in pipeline.targets)
    for drafter in others:
        model, flags = drafter_service(drafter, options.target)
        # the target's hosted drafter, prompt lookup inside the coordinator, or a draft service of its own
        draft_address = DRAFT_IN_TARGET if DrafterSpec.parse(drafter).in_target else LOCAL_NGRAM
        if draft_address == LOCAL_NGRAM and model != LOCAL_NGRAM:
            draft = await spawn_service(f"draft-{drafter_name(drafter)}", "draft_service",
                                        ["--model", model, "--device", options.device,
                                         *runner_flags(options.compile, options.batch_invariant), *flags], 600,
                                        env=pipeline.env("draft_service", options.kv_snapshots))
            pipeline.drafts.append(draft)
            draft_address = draft.address
        coordinator = await spawn_service(f"coordinator-{drafter}", "coordinator", [
            "--target", targets, "--draft", draft_address, "--tokenizer", options.target, *coordinator_flags(drafter),
        ], 600, env=pipeline.env("coordinator"))
        pipeline.extra.append(coordinator)
        coordinators[drafter] = coordinator.address
    return pipeline, coordinators


def drafter_name(spec: str) -> str:
    parsed = DrafterSpec.parse(spec)
    tree = {"": "", "0": "+chains"}.get(parsed.tree, f"+tree{parsed.tree}")
    hybrid = {"": "", "0": "+no-lookup"}.get(parsed.hybrid, f"+ngram{parsed.hybrid}")
    suffix = (hybrid + tree + (f"+{parsed.matmul}" if parsed.matmul else "")
              + (f"+{TORCH_PRODUCTS}" if parsed.torch_products else "") + (f"+{FLOOR}{parsed.floor}" if parsed.floor else "")
              + (f"+{IN_TARGET}" if parsed.in_target else ""))
    if parsed.model in ("ngram", LOCAL_NGRAM, AUTO_DRAFTER):
        return ("eagle3" if parsed.model == AUTO_DRAFTER else parsed.model) + suffix
    return (Path(parsed.model).name or parsed.model) + suffix


async def run_bench(options: BenchOptions) -> dict:
    prompts = load_prompts(options.prompts, options.limit, options.categories)
    rules = options.sampling_rules if options.temperature > 0 else options.sampling_rules[:1]
    suffix = (lambda rule: f"-{rule}") if len(rules) > 1 else (lambda rule: "")
    ours_configs = [(BASELINE, options.drafters[0], 0, rules[0])] + [
        (f"ours-{drafter_name(d)}-k{k}{suffix(rule)}", d, k, rule)
        for d in options.drafters for k in (drafter_ks(d) or options.ks) for rule in rules
    ]
    if options.adaptive:
        ours_configs += [(f"ours-{drafter_name(d)}-adaptive{suffix(rule)}", d, ADAPTIVE, rule)
                         for d in options.drafters for rule in rules]
    if options.sweep_only:
        ours_configs = []
    model_drafts = [d.partition("@")[0] for d in options.drafters
                    if d.partition("@")[0] not in ("ngram", LOCAL_NGRAM, AUTO_DRAFTER)
                    and "+" not in d and not is_drafter_folder(d.partition("@")[0])]
    peer_configs = []
    if options.peers and not options.sweep_only:
        peer_configs = [(HF_PLAIN, {})]
        peer_configs += [(f"hf-assisted-{drafter_name(d)}-k{k}", {"draft": d, "k": k}) for d in model_drafts for k in options.ks]
        peer_configs += [(f"hf-lookup-k{k}", {"prompt_lookup_num_tokens": k, "max_matching_ngram_size": 3})
                         for k in (options.peer_ks or options.ks)]
    total = len(prompts) * (len(ours_configs) + len(peer_configs)) + sum(options.concurrency)
    bar = tqdm(total=total, desc="bench", unit="gen", disable=not options.progress)
    runs: dict[str, list[PromptRun]] = {}
    pipeline, coordinators = await _start_pipelines(options)
    try:
        channels = {d: grpc.aio.insecure_channel(a) for d, a in coordinators.items()}
        stubs = {d: coordinator_pb2_grpc.CoordinatorStub(c) for d, c in channels.items()}
        prompt_ids: dict[int, list[int]] = {}
        # Warm-up: the first call of each path loads lazily initialised pieces.
        for drafter in options.drafters:
            await run_ours(stubs[drafter], prompts[0], BenchOptions(max_new_tokens=4), 2)
        # Prompt by prompt, every configuration in turn: this machine's speed drifts over minutes,
        # and taking turns spreads the drift over all of them alike.
        runs.update({name: [] for name, _, _, _ in ours_configs})
        for i, prompt in enumerate(prompts):
            for name, drafter, k, rule in ours_configs:
                bar.set_postfix_str(name)
                run, ids, _ = await run_ours(stubs[drafter], prompt, options, k, prompt_ids.get(i), rule)
                prompt_ids.setdefault(i, ids)
                runs[name].append(run)
                bar.update()
        sweep = await concurrency_sweep(stubs[options.drafters[0]], prompts, prompt_ids, options, bar)
        for channel in channels.values():
            await channel.close()
    finally:
        await pipeline.stop()
    if peer_configs:
        peers = HFPeers(options.target, options.device)
        peers.generate(prompts[0], prompt_ids[0], BenchOptions(max_new_tokens=4))  # warm-up
        for name, mode in peer_configs:
            bar.set_postfix_str(name)
            if "draft" in mode:
                mode = {"assistant_model": peers.draft(mode["draft"]), "num_assistant_tokens": mode["k"],
                        "num_assistant_tokens_schedule": "constant"}
            runs[name] = []
            for i, prompt in enumerate(prompts):
                runs[name].append(peers.generate(prompt, prompt_ids[i], options, **mode))
                bar.update()
    bar.close()
    overhead = None
    if options.overhead and not options.sweep_only:
        from bench.overhead import measure_overhead

        overhead = await measure_overhead(options.target, k=max(options.ks), device=options.device)
    report = build_report(options, prompts, runs, sweep, ours_configs)
    report["overhead_probe"] = overhead
    return report


async def concurrency_sweep(stub, prompts, prompt_ids, options: BenchOptions, bar) -> list[dict]:
    """N sessions at once for each N: aggregate tokens/s and inter-token latency percentiles."""
    k = ADAPTIVE if options.adaptive else options.ks[0]
    sweep_options = BenchOptions(**{**asdict(options), "max_new_tokens": options.sweep_tokens})
    results = []
    for level in options.concurrency:
        bar.set_postfix_str(f"concurrency {level}")

        async def one(i: int):
            index = i % len(prompts)
            outcome = await run_ours(stub, prompts[index], sweep_options, k, prompt_ids.get(index))
            bar.update()
            return outcome

        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one(i) for i in range(level)))
        wall = time.perf_counter() - started
        tokens = sum(len(run.tokens) for run, _, _ in outcomes)
        gaps = [g for _, _, session_gaps in outcomes for g in session_gaps]
        per_session = sorted(len(run.tokens) / run.wall_s for run, _, _ in outcomes if run.wall_s)
        results.append({
            "sessions": level,
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall if wall else 0.0,
            "itl_p50_ms": 1000 * (percentile(gaps, 0.5) or 0.0),
            "itl_p95_ms": 1000 * (percentile(gaps, 0.95) or 0.0),
            "slowest_session_tokens_per_s": per_session[0] if per_session else 0.0,
            "median_session_tokens_per_s": percentile(per_session, 0.5) or 0.0,
        })
    return results


def _figures(totals: Totals, baseline: Totals | None, hf_plain: Totals | None) -> dict:
    return {
        "prompts": totals.prompts,
        "tokens": totals.tokens,
        "wall_s": totals.wall_s,
        "tokens_per_s": totals.tokens_per_s,
        "speedup_vs_baseline": totals.tokens_per_s / baseline.tokens_per_s if baseline and baseline.tokens_per_s else None,
        "speedup_vs_hf_plain": totals.tokens_per_s / hf_plain.tokens_per_s if hf_plain and hf_plain.tokens_per_s else None,
        "mean_accepted_tokens": totals.mean_accepted_tokens,
        "drafts_per_round": totals.drafts_per_round,
        "acceptance_rate": totals.acceptance_rate,
        "acceptance_by_position": totals.acceptance_by_position,
        "overhead_per_round_ms": totals.overhead_per_round_ms,
        "time_split": totals.time_split(),
    }


def build_report(options, prompts, runs: dict[str, list[PromptRun]], sweep, ours_configs) -> dict:
    columns = [c for c in SPEC_BENCH_COLUMNS if any(column_of(p.category) == c for p in prompts)]
    columns += sorted({column_of(p.category) for p in prompts} - set(columns))

    def totals(name: str, column: str | None = None) -> Totals | None:
        if name not in runs:
            return None
        return Totals.of(r for r in runs[name] if column is None or column_of(r.category) == column)

    base_all = totals(BASELINE)
    step_s = base_all.verify_s / base_all.rounds if base_all and base_all.rounds else None
    report = {"machine": machine_info(options.device), "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
              "prompts": len(prompts), "columns": columns, "configs": {}, "concurrency": sweep}
    ks = {name: k for name, _, k, _ in ours_configs}
    for name in runs:
        entry = {"columns": {}, "overall": _figures(totals(name), base_all, totals(HF_PLAIN))}
        for column in columns:
            entry["columns"][column] = _figures(totals(name, column), totals(BASELINE, column), totals(HF_PLAIN, column))
        overall = totals(name)
        k = ks.get(name, 0)
        if k > 0 and overall.rounds and overall.acceptance_rate is not None and step_s:
            draft_step_s = overall.draft_s / overall.draft_tokens if overall.draft_tokens else 0.0
            cost_ratio = draft_step_s / step_s
            ideal = ideal_speedup(overall.acceptance_rate, k, cost_ratio)
            # What the measured compute alone allows: tokens per round at the measured draft and
            # verify cost per round, against the baseline's verify cost per token.
            compute_bound = overall.mean_accepted_tokens * step_s / ((overall.verify_s + overall.draft_s) / overall.rounds)
            measured = entry["overall"]["speedup_vs_baseline"]
            entry["ideal"] = {
                "cost_ratio_c": cost_ratio,
                "ideal_speedup": ideal,
                "efficiency": measured / ideal if ideal else None,
                "compute_bound_speedup": compute_bound,
                "efficiency_vs_compute_bound": measured / compute_bound if compute_bound else None,
            }
        if options.temperature == 0 and name != BASELINE and BASELINE in runs:
            mismatched = [r.question_id for r, b in zip(runs[name], runs[BASELINE]) if r.tokens != b.tokens]
            entry["greedy_matches_baseline"] = not mismatched
            entry["mismatched_prompts"] = mismatched
        report["configs"][name] = entry
    return report
