"""Quick checks on a CUDA device with a random SmolLM2-shaped model (the shapes, not the weights,
decide speed and rounding): is the runner batch- and chunk-invariant there, and what does one
target step cost, ours against Hugging Face's forward, for 1-8 new tokens and for 16 sessions.

    python bench/gpu/cuda_checks.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
               rms_norm_eps=1e-5)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int = 10) -> float:
    for _ in range(2):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="cuda_checks.json")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = args.device
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": args.layers})).to(
        device, getattr(torch, args.dtype)).eval()
    runner = ModelRunner(model, 49152)
    tokens = torch.randint(0, 49152, (480,)).tolist()
    report = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device,
              "torch": torch.__version__, "dtype": args.dtype}

    whole = runner.forward([ForwardJob(SessionCache(), tokens[:300], 0)])[0].logits
    entry, rows = SessionCache(), []
    for n in range(1, 301):
        rows.append(runner.forward([ForwardJob(entry, tokens[:n], n - 1)])[0].logits)
    incremental = torch.cat(rows)
    others = [SessionCache() for _ in range(3)]
    entry, rows, done = SessionCache(), [], 0
    while done < 300:
        end = min(300, done + 7)
        jobs = [ForwardJob(entry, tokens[:end], done)] + [
            ForwardJob(o, tokens[::-1][: 20 * (i + 1) + end], 20 * (i + 1) + end - 1) for i, o in enumerate(others)]
        rows.append(runner.forward(jobs)[0].logits)
        done = end
    batched = torch.cat(rows)
    report["invariance"] = {
        "token_by_token_equal": bool(torch.equal(incremental, whole)),
        "token_by_token_max_diff": float((incremental - whole).abs().max()),
        "batched_chunks_equal": bool(torch.equal(batched, whole)),
        "batched_chunks_max_diff": float((batched - whole).abs().max()),
    }

    from transformers import DynamicCache

    steps = []
    context = 400
    for n in (1, 2, 4, 6, 8):
        entry = SessionCache()
        runner.forward([ForwardJob(entry, tokens[:context], context - 1)])
        ours = _timed(lambda: runner.forward([ForwardJob(entry, tokens[: context + n], context)]))
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([tokens[:context]], device=device), past_key_values=cache, use_cache=True,
                  logits_to_keep=1)

            def hf_step():
                if cache.get_seq_length() > context:
                    cache.crop(context - cache.get_seq_length())
                model(input_ids=torch.tensor([tokens[context : context + n]], device=device), past_key_values=cache,
                      use_cache=True, logits_to_keep=n)

            theirs = _timed(hf_step)
        steps.append({"new_tokens": n, "ours_ms": round(1000 * ours, 2), "hf_ms": round(1000 * theirs, 2)})
    report["step_at_400"] = steps

    entries = [SessionCache() for _ in range(16)]
    for i, e in enumerate(entries):
        runner.forward([ForwardJob(e, tokens[i : i + context], context - 1)])
    batch16 = _timed(lambda: runner.forward([ForwardJob(e, tokens[i : i + context + 5], context)
                                             for i, e in enumerate(entries)]), reps=5)
    single = _timed(lambda: runner.forward([ForwardJob(entries[0], tokens[: context + 5], context)]), reps=5)
    report["verify_5_tokens"] = {"one_session_ms": round(1000 * single, 2), "sixteen_sessions_ms": round(1000 * batch16, 2),
                                 "throughput_ratio_16_vs_1": round(16 * single / batch16, 2)}
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as out:
        json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
