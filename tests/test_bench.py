"""The benchmark's arithmetic, and one small end-to-end run of the harness on tiny models."""

from __future__ import annotations

import json

import pytest

from bench import report as bench_report
from bench.figures import PromptRun, Totals, column_of, expected_tokens_per_step, ideal_speedup, percentile
from bench.harness import (BenchOptions, coordinator_flags, drafter_ks, drafter_name, drafter_service, hosted_drafter,
                           load_prompts, run_bench)


def test_leviathan_expected_tokens_and_ideal_speedup():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    # A free drafter (c = 0) turns every expected token into speedup; a costly one eats it.
    assert ideal_speedup(0.8, 4, 0.0) == pytest.approx((1 - 0.8**5) / 0.2)
    assert ideal_speedup(0.8, 4, 0.25) == pytest.approx((1 - 0.8**5) / 0.2 / 2)


def test_totals_and_percentiles():
    runs = [
        PromptRun(1, "qa", [1, 2, 3, 4], 2.0, rounds=2, draft_tokens=4, accepted_tokens=2,
                  accepted_per_position=[2, 0], proposed_per_position=[2, 2], network_coordinator_s=0.004),
        PromptRun(2, "qa", [5, 6], 1.0, rounds=2, draft_tokens=2, accepted_tokens=0,
                  accepted_per_position=[0], proposed_per_position=[2]),
    ]
    totals = Totals.of(runs)
    assert totals.tokens_per_s == pytest.approx(6 / 3.0)
    assert totals.mean_accepted_tokens == pytest.approx(6 / 4)
    assert totals.acceptance_rate == pytest.approx(2 / 6) and totals.drafts_per_round == pytest.approx(6 / 4)
    assert totals.acceptance_by_position == [0.5, 0.0]
    assert totals.overhead_per_round_ms == pytest.approx(1.0)
    assert percentile([4, 1, 3, 2], 0.5) == pytest.approx(2.5)
    assert percentile([], 0.5) is None
    assert column_of("writing") == "Multi-turn Conversation" and column_of("rag") == "Retrieval-aug. Generation"


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"question_id": 1, "category": "qa", "turns": ["what is a cat? a cat is a cat."]},
        {"question_id": 2, "category": "qa", "turns": ["second qa prompt"]},
        {"question_id": 3, "category": "translation", "turns": ["translate: hallo welt, hallo welt"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_drafter_specs_name_trees_hybrids_and_ks():
    assert drafter_name("auto+tree12@4/6") == "eagle3+tree12" and drafter_ks("auto+tree12@4/6") == (4, 6)
    assert coordinator_flags("auto+tree12@4") == ("--tree-nodes", "12") and coordinator_flags("auto") == ()
    assert coordinator_flags("auto+tree0") == ("--tree-nodes", "0") and drafter_name("auto+tree0") == "eagle3+chains"
    assert drafter_service("/d/x+ngram3+tree8", "smollm2") == ("/d/x", ("--hybrid-ngram", "3"))
    assert drafter_name("/d/x+ngram3+tree8") == "x+ngram3+tree8"
    assert drafter_name("auto+ngram0") == "eagle3+no-lookup" and drafter_name("auto+ngram3") == "eagle3+ngram3"
    assert drafter_service("/d/x+ngram0", "smollm2") == ("/d/x", ("--hybrid-ngram", "0"))
    assert drafter_service("/d/x+ngram0+float32@4", "smollm2") == (
        "/d/x", ("--hybrid-ngram", "0", "--matmul-dtype", "float32"))
    assert drafter_name("auto+tree7+float32") == "eagle3+tree7+float32" and drafter_ks("auto+float32@5") == (5,)
    assert drafter_service("/d/x+torch+tree7@5", "smollm2") == ("/d/x", ("--cpu-kernels", "torch"))
    assert drafter_name("auto+torch+tree7") == "eagle3+tree7+torch" and coordinator_flags("auto+torch+tree7") == (
        "--tree-nodes", "7")
    assert coordinator_flags("auto+floor0+tree3@2") == ("--tree-nodes", "3", "--min-draft-confidence", "0")
    assert drafter_name("auto+tree3+floor0.2") == "eagle3+tree3+floor0.2" and drafter_ks("auto+floor0@5") == (5,)
    assert drafter_service("/d/x+floor0.1+ngram2", "smollm2") == ("/d/x", ("--hybrid-ngram", "2"))
    # '+target': the drafter the target hosts; one such drafter per run
    assert drafter_name("auto+target+tree7@5") == "eagle3+tree7+target" and drafter_ks("auto+target@5") == (5,)
    assert hosted_drafter(["ngram", "/d/x+target", "/d/x+tree3+target"], "smollm2") == "/d/x"
    assert hosted_drafter(["/d/x", "ngram"], "smollm2") == ""
    with pytest.raises(ValueError, match="one drafter"):
        hosted_drafter(["/d/x+target", "/d/y+target"], "smollm2")


def test_prompt_selection(prompt_file):
    assert [p.question_id for p in load_prompts(prompt_file, 1, ())] == [1, 3]
    assert [p.question_id for p in load_prompts(prompt_file, 5, ("qa",))] == [1, 2]
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(prompt_file, 1, ("rag",))


async def test_bench_runs_every_configuration_and_writes_its_outputs(tiny_target, tiny_draft, prompt_file, tmp_path):
    options = BenchOptions(
        prompts=prompt_file, limit=1, max_new_tokens=8, target=str(tiny_target),
        drafters=("ngram", "local-ngram", str(tiny_draft)), ks=(2,), concurrency=(1, 2), sweep_tokens=6,
        overhead=False, out=tmp_path / "out", progress=False,
    )
    report = await run_bench(options)
    configs = report["configs"]
    assert set(configs) == {"ours-k0", "ours-ngram-k2", "ours-draft-k2", "ours-ngram-adaptive", "ours-draft-adaptive",
                            "ours-local-ngram-k2", "ours-local-ngram-adaptive",
                            "hf-plain", "hf-assisted-draft-k2", "hf-lookup-k2"}
    assert report["columns"] == ["Translation", "Question Answering"]
    for name, entry in configs.items():
        if name != "ours-k0":
            # Greedy everywhere: every configuration, ours and the peers, reproduces the baseline.
            assert entry["greedy_matches_baseline"], f"{name} changed the output: {entry['mismatched_prompts']}"
        assert entry["overall"]["tokens_per_s"] > 0
    assert configs["ours-k0"]["overall"]["mean_accepted_tokens"] == pytest.approx(1.0)
    assert configs["ours-k0"]["overall"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert "ideal" in configs["ours-draft-k2"] and configs["ours-draft-k2"]["ideal"]["ideal_speedup"] > 0
    assert [row["sessions"] for row in report["concurrency"]] == [1, 2]
    written = bench_report.write(report, options.out)
    assert {p.name for p in written} == {"results.json", "results.md", "speedup_by_category.png", "concurrency.png"}
    markdown = (options.out / "results.md").read_text()
    assert "| Configuration | Translation | Question Answering | Overall | #Mean accepted tokens |" in markdown
    assert json.loads((options.out / "results.json").read_text())["machine"]["cpu_count"] >= 1


async def test_the_snapshot_bench_runs_and_both_paths_agree(tiny_target, tmp_path):
    from bench.snapshot import measure

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"prompt {i}: tell me about the sea and the sky"]}) + "\n"
                               for i in range(8)))
    result = await measure(str(tiny_target), tokens=200, reps=1, device="cpu", redis_url=None, prompts=prompts)
    # measure() itself checks that both paths give the same argmax and reuse what they should.
    assert result["snapshot_tokens"] == 200 and result["snapshot_mib"] > 0
    assert len(result["restore_all_s"]) == len(result["recompute_all_s"]) == 1


def test_tree_shapes_counts_kept_drafts_and_walks_rounds_as_a_decode_would():
    from bench.tree_shapes import _walk, kept_path, off_the_leading_chain

    # A chain 5 6 7 against the target's 5 6 9: two kept; a tree with 9 beside 7 keeps all three.
    assert len(kept_path([5, 6, 7], None, [5, 6, 9])) == 2
    assert len(kept_path([5, 6, 7, 9], [-1, 0, 1, 1], [5, 6, 9])) == 3
    assert len(kept_path([5, 6, 7], None, [5])) == 1  # past the answer's end nothing more is kept
    # Rounds from positions 0 (3 tokens) and 3 (2 tokens): positions 1, 2 and 4 never start one.
    assert _walk([3, 1, 1, 2, 1]) == [0, 3] and len(_walk([1, 1, 1])) == 3 and _walk([]) == []
    # The tree 5 6 7 | 9 (under 6): the target's 5 6 9 keeps nodes 0, 1, 3, the last off the chain.
    assert kept_path([5, 6, 7, 9], [-1, 0, 1, 1], [5, 6, 9]) == (0, 1, 3)
    assert off_the_leading_chain((0, 1, 3)) == 1 and off_the_leading_chain((0, 1, 2)) == 0
    assert off_the_leading_chain((3, 4)) == 2 and off_the_leading_chain(()) == 0


def test_tree_shapes_names_what_the_draft_vocabulary_leaves_out():
    from bench.tree_shapes import draft_vocabulary_coverage, stopped_outside

    vocabulary = {5, 6, 7}
    # Two drafts kept of k = 3, the target's next choice 9 lies outside: only a copy could hold it.
    assert stopped_outside(2, [5, 6, 9], 3, vocabulary)
    assert not stopped_outside(1, [5, 6, 9], 3, vocabulary)  # it stopped at 6, which the head has
    assert not stopped_outside(3, [5, 6, 9, 4], 3, vocabulary)  # it reached k
    assert not stopped_outside(2, [5, 6], 3, vocabulary)  # the answer ended
    answers = [("a", [1, 2, 5, 9], 2, None), ("b", [1, 5, 6, 7, 8], 1, None)]
    assert draft_vocabulary_coverage(answers, vocabulary) == {"a": 0.5, "b": 0.75, "all": round(4 / 6, 3)}


def test_fixed_workload_reads_a_process_cpu_time_from_proc():
    import os
    import subprocess
    import sys
    import time

    from bench.fixed_workload import cpu_seconds

    before = cpu_seconds(os.getpid())
    if before is None:
        pytest.skip("no /proc on this system")
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # spend CPU time, which the kernel's tick count must show
        pass
    assert cpu_seconds(os.getpid()) >= before + 0.1
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert cpu_seconds(gone.pid) is None  # reaped: nothing left to read


def test_greedy_answers_are_the_targets_own_and_kept_for_the_next_run(tiny_target, prompt_file, tmp_path):
    import torch

    from bench.harness import greedy_answers
    from specdec import models

    model, tokenizer = models.load_model(str(tiny_target)), models.load_tokenizer(str(tiny_target))
    cache = tmp_path / "answers.json"
    made = greedy_answers("tiny", model, tokenizer, 1, 6, cache, prompt_file)
    assert [a.category for a in made] == ["qa", "translation"]  # the first prompt of each category
    with torch.inference_mode():
        out = model.generate(torch.tensor([made[1].prompt]), max_new_tokens=6, do_sample=False)
    assert made[1].answer == out[0, len(made[1].prompt):].tolist()
    # A run with the same settings reads the file and never runs a model; other settings make them afresh.
    assert greedy_answers("tiny", None, tokenizer, 1, 6, cache, prompt_file) == made
    with pytest.raises(AttributeError):
        greedy_answers("tiny", None, tokenizer, 1, 7, cache, prompt_file)


def test_kernels_ab_builds_each_tree_and_refuses_trees_that_compute_other_bits(tmp_path):
    """bench.kernels_ab: a git revision's kernel sources come out of git, a directory's kernels
    build and time in turns; a tree whose attention divides by its sum another way (other bits) is
    refused."""
    import shutil

    from bench import kernels_ab
    from specdec import cpu_kernels
    from specdec.cpu_kernels import CpuAttention

    if not cpu_kernels.c_compiler():
        pytest.skip("no C compiler")
    changed = tmp_path / "changed" / "specdec"
    changed.mkdir(parents=True)
    for path in cpu_kernels.SOURCES + cpu_kernels.HEADERS:
        shutil.copy(path, changed / path.name)
    attention = changed / "cpu_attention.c"
    source = attention.read_text()
    assert "/ *total" in source
    attention.write_text(source.replace("/ *total", "* (1.0f / *total)"))
    revision = kernels_ab.sources("HEAD", tmp_path)  # (a revision's sources written out of git)
    assert revision.parent.parent == tmp_path and "specdec_attend" in (revision / "cpu_attention.c").read_text()
    trees = {"here": kernels_ab.sources(".", tmp_path), "changed": kernels_ab.sources(str(changed.parent), tmp_path)}
    kernels = {name: CpuAttention(kernels_ab.build(folder, tmp_path / f"{name}.so")) for name, folder in trees.items()}
    timed = kernels_ab.attention({"here": kernels["here"], "here again": kernels["here"]}, context=40, reps=2)
    assert set(timed) == {"here_ms", "here again_ms"} and all(ms > 0 for ms in timed.values())
    with pytest.raises(SystemExit, match="changed"):
        kernels_ab.attention(kernels, context=40, reps=2)
