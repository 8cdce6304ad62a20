"""One target step, in process: our batch-invariant runner against Hugging Face's own forward
pass with its DynamicCache, for 1 to 8 new tokens after a cached context.

    python -m bench.step --context 400          # make bench-step

Median of --reps timed steps after a warm-up, each a crop back to the context and a forward of
the new tokens (what a verify of k + 1 = n tokens costs), the runners taking turns step by step
(bench.timing.medians_ms), so that drift in the machine's speed falls on all of them alike. The
ratio to hf_ms is what bitwise invariance (each output's sums in a fixed order, attention row by
row) costs, or saves, per step. Our runner, besides its default (products, attention and a layer's
small steps in C, specdec.cpu_kernels; the products on a .gguf model's weights packed back into its
GGML blocks, specdec.ggml_blocks): ours_float32_weights_ms with the C products on float32 weights
(the same bits, six times the bytes for Q4_1); ours_pass_calls_ms with a layer's two halves and
its attention each their own call from Python (the default runs every layer of a pass in one C
call, cpu_kernels.FusedLayers: the same bits); ours_layer_calls_ms with each product and small
step its own call (cpu_kernels.FusedLayer makes a layer's halves around its attention one call
each: the same bits); ours_torch_steps_ms with the small steps (norms,
rotary, activation, residuals) in torch; ours_onednn_ms with oneDNN's products instead and torch's
steps (rows padded to a multiple of 4; the default before the C products, and where no C compiler
is); ours_f_linear_ms with F.linear's (MKL's; rows padded); ours_not_invariant_ms with F.linear's
and --batch-invariant false (one-row passes unpadded: the BLAS's one-row kernel, as Hugging Face's
forward has it); ours_torch_attention_ms with the C products and steps but torch's attention
blocks."""

from __future__ import annotations

import argparse
import json

import torch

from bench.timing import medians_ms
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner


def _our_step(runner: ModelRunner, tokens: list[int], context: int, n: int):
    """One verify of n new tokens after a cached context: a crop back to it and a forward."""
    entry = SessionCache()
    runner.forward([ForwardJob(entry, tokens[:context], context - 1)])
    return lambda: runner.forward([ForwardJob(entry, tokens[: context + n], context)])


def _hugging_face_step(model, tokens: list[int], context: int, n: int):
    """The same step through Hugging Face's forward with its DynamicCache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([tokens[:context]]), past_key_values=cache, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def step():
        if cache.get_seq_length() > context:
            cache.crop(context - cache.get_seq_length())
        model(input_ids=torch.tensor([tokens[context : context + n]]), past_key_values=cache, use_cache=True,
              logits_to_keep=n)
    return step


def _our_runners(model_spec: str) -> tuple[object, int, dict[str, ModelRunner]]:
    """The model, its vocabulary size, and our runner the ways the module's docstring names."""
    model = models.load_model(model_spec)
    vocab = len(models.load_tokenizer(model_spec))
    return model, vocab, {
        "ours_ms": ModelRunner(model, vocab),
        "ours_float32_weights_ms": ModelRunner(model, vocab, c_blocks=False),
        "ours_pass_calls_ms": ModelRunner(model, vocab, c_pass=False),
        "ours_layer_calls_ms": ModelRunner(model, vocab, c_layers=False),
        "ours_torch_steps_ms": ModelRunner(model, vocab, c_steps=False),
        "ours_onednn_ms": ModelRunner(model, vocab, c_products=False),
        "ours_f_linear_ms": ModelRunner(model, vocab, c_products=False, onednn=False),
        "ours_not_invariant_ms": ModelRunner(model, vocab, c_products=False, onednn=False, invariant=False),
        "ours_torch_attention_ms": ModelRunner(model, vocab, c_attention=False),
    }


def measure(model_spec: str, context: int, reps: int, sizes: tuple[int, ...], compiled: bool = False) -> list[dict]:
    model, vocab, runners = _our_runners(model_spec)
    if compiled:
        runners["ours_compiled_ms"] = ModelRunner(model, vocab, compile=True)
        runners["ours_compiled_ms"].warm_up()
    tokens = torch.randint(0, vocab, (context + max(sizes),), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for n in sizes:
        calls = {name: _our_step(r, tokens, context, n) for name, r in runners.items()}
        calls["hf_ms"] = _hugging_face_step(model, tokens, context, n)
        times = medians_ms(calls, reps)
        rows.append({"new_tokens": n, **{name: round(ms, 1) for name, ms in times.items()},
                     "ours_vs_hf": round(times["ours_ms"] / times["hf_ms"], 2)})
    return rows


def measure_prefills(model_spec: str, lengths: tuple[int, ...], reps: int) -> list[dict]:
    """A prompt's prefill in one pass, our runners (the BLAS's products invariant in pieces of
    product_rows rows, one piece when not invariant; the C products whole) and Hugging Face's
    forward taking turns."""
    model, vocab, runners = _our_runners(model_spec)
    tokens = torch.randint(0, vocab, (max(lengths),), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for n in lengths:
        prefill = lambda r: lambda: r.forward([ForwardJob(SessionCache(), tokens[:n], n - 1)])  # noqa: E731
        calls = {name: prefill(r) for name, r in runners.items()}
        calls["hf_ms"] = torch.inference_mode()(lambda: model(input_ids=torch.tensor([tokens[:n]]), logits_to_keep=1))
        times = medians_ms(calls, reps)
        rows.append({"prompt_tokens": n, "onednn_product_rows": runners["ours_onednn_ms"].product_rows,
                     **{name: round(ms, 1) for name, ms in times.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--sizes", default="1,2,3,4,5,6,8")
    parser.add_argument("--compiled", action="store_true", help="also our runner with --compile on")
    parser.add_argument("--prefills", default="",
                        help="instead: prefills of these prompt lengths (comma-separated), what our runners' "
                             "products (the BLAS's in pieces of product_rows rows) cost")
    args = parser.parse_args()
    if args.prefills:
        rows = measure_prefills(args.model, tuple(int(n) for n in args.prefills.split(",")), min(args.reps, 3))
        print(json.dumps({"model": args.model, "torch_threads": torch.get_num_threads(), "prefills": rows}, indent=1))
        return
    rows = measure(args.model, args.context, args.reps, tuple(int(s) for s in args.sizes.split(",")), args.compiled)
    print(json.dumps({"model": args.model, "context": args.context, "torch_threads": torch.get_num_threads(),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
