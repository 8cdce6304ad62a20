"""Writing a bench report: JSON with every figure, a Markdown table in Spec-Bench's layout, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path


def _f(value, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(report: dict) -> str:
    columns = report["columns"]
    machine = report["machine"]
    options = report["options"]
    lines = [
        f"Machine: {machine.get('cpu', machine['platform'])}, {machine['cpu_count']} cores"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; torch {machine['torch']} on {machine['device']}.",
        f"Prompts: {report['prompts']} ({options['limit']} per category of {Path(options['prompts']).name}), "
        f"max_new_tokens {options['max_new_tokens']}, "
        + ("greedy" if options["temperature"] == 0 else f"temperature {options['temperature']}, top_p {options['top_p']}")
        + ".",
        "",
        "### Speedup over target-only decoding through our services (ours-k0), Spec-Bench layout",
        "",
        "| Configuration | " + " | ".join(columns) + " | Overall | #Mean accepted tokens |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for name, entry in report["configs"].items():
        cells = [_f(entry["columns"][c]["speedup_vs_baseline"], 2, "x") for c in columns]
        overall = entry["overall"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_f(overall['speedup_vs_baseline'], 2, 'x')} | "
                     f"{_f(overall['mean_accepted_tokens'])} |")
    lines += [
        "",
        "### Throughput, peers, ideal speedup and where the time goes (all prompts)",
        "",
        "| Configuration | tokens/s | vs ours-k0 | vs hf-plain | drafts/round | acceptance | by position | ideal (Leviathan) | "
        "efficiency | compute-bound | overhead/round (drafting included) | draft s | verify s | "
        "net+coord s (drafting included) | redis s | greedy = baseline |",
        "|---|" + "---|" * 15,
    ]
    for name, entry in report["configs"].items():
        o = entry["overall"]
        ideal = entry.get("ideal", {})
        split = o["time_split"]
        match = entry.get("greedy_matches_baseline")
        lines.append(
            f"| {name} | {_f(o['tokens_per_s'], 1)} | {_f(o['speedup_vs_baseline'], 2, 'x')} | "
            f"{_f(o['speedup_vs_hf_plain'], 2, 'x')} | {_f(o.get('drafts_per_round'))} | {_f(o['acceptance_rate'])} | "
            f"{' '.join(f'{a:.2f}' for a in o['acceptance_by_position']) or 'n/a'} | "
            f"{_f(ideal.get('ideal_speedup'), 2, 'x')} | {_f(ideal.get('efficiency'))} | "
            f"{_f(ideal.get('compute_bound_speedup'), 2, 'x')} | {_f(o['overhead_per_round_ms'], 2, ' ms')} | "
            f"{split['draft_s']:.2f} | {split['verify_s']:.2f} | {split['network_coordinator_s']:.2f} | "
            f"{split['redis_s']:.3f} | {'n/a' if match is None else ('yes' if match else 'NO: ' + str(entry['mismatched_prompts']))} |"
        )
    lines += [
        "",
        f"### Concurrency sweep ({report['options']['sweep_tokens']} new tokens a session)",
        "",
        "| sessions | aggregate tokens/s | p50 inter-token latency | p95 inter-token latency | slowest / median session tokens/s |",
        "|---|---|---|---|---|",
    ]
    for row in report["concurrency"]:
        lines.append(
            f"| {row['sessions']} | {row['tokens_per_s']:.1f} | {row['itl_p50_ms']:.1f} ms | {row['itl_p95_ms']:.1f} ms | "
            f"{row['slowest_session_tokens_per_s']:.1f} / {row['median_session_tokens_per_s']:.1f} |"
        )
    probe = report.get("overhead_probe")
    if probe:
        lines += [
            "",
            f"### Overhead per round, model compute excluded (random 2-layer stand-in, {probe['vocab_size']}-token "
            f"vocabulary, n-gram drafter, k={probe['k']})",
            "",
            "| mode | round | network + coordinator | draft compute | verify compute | Redis |",
            "|---|---|---|---|---|---|",
        ]
        for mode in ("greedy", "sampled", "greedy local-ngram", "sampled local-ngram"):
            if mode not in probe:
                continue
            row = probe[mode]
            lines.append(f"| {mode} | {row['round_ms']:.2f} ms | {row['overhead_ms']:.2f} ms | {row['draft_ms']:.2f} ms | "
                         f"{row['verify_ms']:.2f} ms | {row['redis_ms']:.2f} ms |")
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    columns = report["columns"] + ["Overall"]
    names = list(report["configs"])
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(columns)), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        entry = report["configs"][name]
        values = [entry["columns"][c]["speedup_vs_baseline"] or 0 for c in report["columns"]]
        values.append(entry["overall"]["speedup_vs_baseline"] or 0)
        ax.bar([x + i * width for x in range(len(columns))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(columns))])
    ax.set_xticklabels(columns, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("speedup over ours-k0")
    ax.set_title("Speedup by Spec-Bench category")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "speedup_by_category.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    sweep = report["concurrency"]
    if sweep:
        fig, left = plt.subplots(figsize=(7, 4.5))
        sessions = [r["sessions"] for r in sweep]
        left.plot(sessions, [r["tokens_per_s"] for r in sweep], "o-", color="tab:blue", label="aggregate tokens/s")
        left.set_xlabel("concurrent sessions")
        left.set_ylabel("aggregate tokens/s", color="tab:blue")
        left.set_xscale("log", base=2)
        right = left.twinx()
        right.plot(sessions, [r["itl_p50_ms"] for r in sweep], "s--", color="tab:orange", label="p50 ITL")
        right.plot(sessions, [r["itl_p95_ms"] for r in sweep], "^--", color="tab:red", label="p95 ITL")
        right.set_ylabel("inter-token latency (ms)", color="tab:red")
        fig.legend(loc="upper left", fontsize=8)
        left.set_title("Throughput and latency against concurrency")
        fig.tight_layout()
        path = out / "concurrency.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    return [out / "results.json", out / "results.md", *plots(report, out)]
