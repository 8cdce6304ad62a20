"""`specdec up` starts real processes and prints one JSON line; `specdec generate` talks to
them; SIGTERM stops everything. Tiny models keep it quick."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TIER_TOKEN, REPO


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _specdec(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specdec.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, **kwargs)


@pytest.fixture(scope="module")
def running_up(tiny_target, tiny_draft):
    process = subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", "up", "--target", str(tiny_target), "--draft", str(tiny_draft),
         "--target-replicas", "2", "--torch-threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
    )
    line = process.stdout.readline()
    assert line, "specdec up printed nothing"
    yield process, json.loads(line)
    if process.poll() is None:
        process.kill()
        process.wait()


def test_up_prints_every_service_and_they_run(running_up):
    _, summary = running_up
    assert summary["coordinator"] and summary["redis"].startswith("redis://127.0.0.1:")
    assert len(summary["target"]) == 2 and len(summary["draft"]) == 1
    for service in summary["target"] + summary["draft"]:
        assert service["address"].startswith("127.0.0.1:") and _alive(service["pid"])
        assert service["metrics"].startswith("127.0.0.1:")
    assert summary["coordinator_metrics"].startswith("127.0.0.1:")


def test_generate_json_and_continuation(running_up):
    _, summary = running_up
    first = _specdec("generate", "hello there", "--server", summary["coordinator"], "--max-new-tokens", "12",
                     "--k", "3", "--json")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert set(result) == {"session_id", "prompt_token_ids", "token_ids", "text", "finish_reason", "stats"}
    assert len(result["token_ids"]) <= 12 and result["finish_reason"] in ("length", "eos")
    assert result["stats"]["rounds"] >= 1 and result["stats"]["k"] == 3
    second = _specdec("generate", "more", "--server", summary["coordinator"], "--session", result["session_id"],
                      "--max-new-tokens", "5", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["session_id"] == result["session_id"]
    # The coordinator's /metrics counts what it served.
    import urllib.request

    body = urllib.request.urlopen(f"http://{summary['coordinator_metrics']}/metrics", timeout=5).read().decode()
    rounds = float(next(line.split()[1] for line in body.splitlines() if line.startswith("specdec_rounds_total ")))
    assert rounds >= result["stats"]["rounds"]


def test_generate_streams_text_and_reports_errors(running_up):
    _, summary = running_up
    streamed = _specdec("generate", "hi", "--server", summary["coordinator"], "--max-new-tokens", "8")
    assert streamed.returncode == 0 and "finish:" in streamed.stderr and "accepted" in streamed.stderr
    bad = _specdec("generate", "hi", "--server", summary["coordinator"], "--temperature", "-1")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "temperature" in bad.stderr


def test_sigterm_stops_everything(running_up):
    process, summary = running_up
    pids = [s["pid"] for s in summary["target"] + summary["draft"]] + [summary["coordinator_pid"]]
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), "a service outlived specdec up"


def test_services_document_their_flags():
    for module, flag, env in [("target_service", "--cache-bytes", "SPECDEC_TARGET_CACHE_BYTES"),
                              ("draft_service", "--ngram-max", "SPECDEC_DRAFT_NGRAM_MAX"),
                              ("coordinator", "--redis-url", "SPECDEC_COORDINATOR_REDIS_URL")]:
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0 and flag in out.stdout and env in out.stdout


def test_each_service_shuts_down_cleanly_on_sigterm(redis_server, tiny_target, tiny_draft):
    """Exit code 0 and no traceback: the snapshot writers flush, the coordinator closes its
    channels and Redis after the server stops."""
    def spawn(module: str, *args: str, env: dict) -> tuple[subprocess.Popen, str]:
        process = subprocess.Popen([sys.executable, "-m", module, *args, "--metrics-port", "-1"], cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, **env})
        return process, json.loads(process.stdout.readline())["listening"]

    target, target_address = spawn("target_service", "--model", str(tiny_target),
                                   env={"SPECDEC_TARGET_REDIS_URL": redis_server.url,
                                        "SPECDEC_TARGET_TIER_TOKEN": TIER_TOKEN})
    draft, draft_address = spawn("draft_service", "--model", str(tiny_draft),
                                 env={"SPECDEC_DRAFT_REDIS_URL": redis_server.url, "SPECDEC_DRAFT_TIER_TOKEN": TIER_TOKEN})
    coordinator, address = spawn("coordinator", "--target", target_address, "--draft", draft_address,
                                 "--tokenizer", str(tiny_target),
                                 env={"SPECDEC_COORDINATOR_REDIS_URL": redis_server.url,
                                      "SPECDEC_COORDINATOR_TIER_TOKEN": TIER_TOKEN})
    generated = _specdec("generate", "a long enough prompt to write a snapshot, " * 3, "--server", address,
                         "--max-new-tokens", "20")
    assert generated.returncode == 0, generated.stderr
    for process in (coordinator, draft, target):
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        stderr = process.stderr.read()
        assert "Traceback" not in stderr, stderr


def test_a_feature_drafter_is_hosted_by_the_target_unless_placed_in_its_tier(tiny_draft):
    """--draft-placement: 'auto' puts the shipped feature drafter in the target (no draft tier) and
    keeps a model drafter or n-gram in theirs; 'tier' keeps a feature drafter in its own; 'target'
    refuses what a target cannot host."""
    from specdec.cli import _launch_options, build_parser

    def in_target(*argv: str) -> bool:
        return _launch_options(build_parser().parse_args(["up", *argv])).draft_in_target

    assert in_target() and in_target("--draft", str(REPO / "drafters" / "smollm2-eagle3"))
    assert not in_target("--draft-placement", "tier")
    assert not in_target("--draft", "ngram") and not in_target("--draft", str(tiny_draft))
    with pytest.raises(RuntimeError, match="only a feature drafter"):
        in_target("--draft", "ngram", "--draft-placement", "target")
