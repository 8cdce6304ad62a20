"""The C kernels of two or more checkouts, side by side in one process: A/B runs of a kernel change.

    python -m bench.kernels_ab --trees before=HEAD~1 after=.        # make bench-kernels
    python -m bench.kernels_ab --trees a=/tmp/a b=/tmp/b --context 1200 --rows 1,8

Each tree (a git revision of this repository, or a directory holding specdec/*.c) has its kernels
built into a library of its own and loaded beside the others, so the versions take turns call by
call in one process: on a shared 2-core host whose speed drifts by 10-20% within minutes (bench/
RESULTS.md) that is what makes a few percent measurable, where separate runs are not. Two
workloads, each over more memory than a core's caches hold, as a target step reads it:

  products   the default target's products on synthetic weights of its shapes and formats (30
             layers of q|k|v 960 x 576, o 576 x 576, gate|up 3072 x 576, down 576 x 1536 in Q4_1,
             the head 49152 x 576 in Q8_0), for each --rows;
  attention  one row's attention over 30 layers' caches of --context keys (9 query heads, 3 kv
             heads, 64 dims), as a one-token step at that context.

Prints each tree's median and fastest time per workload, and checks that every tree computes the
same bits (a kernel change that is only about speed must not move a number).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
from pathlib import Path

import torch

from bench.timing import medians_ms
from specdec import cpu_kernels, ggml_blocks
from specdec.cpu_kernels import CpuAttention, CpuLinear, KeyLists, PackedWeight

REPO = Path(__file__).resolve().parent.parent
LAYERS = 30
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # q|k|v, o, gate|up, down: [outs, in]
HEAD = (49152, 576)


def sources(tree: str, scratch: Path) -> Path:
    """The directory holding `tree`'s specdec/*.c and *.h: the tree itself, or a git revision of
    this repository written out under `scratch`."""
    if (Path(tree) / "specdec" / "cpu_linear.c").exists():
        return Path(tree) / "specdec"
    out = scratch / tree.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    names = [path.name for path in cpu_kernels.SOURCES + cpu_kernels.HEADERS]
    archive = subprocess.run(["git", "-C", str(REPO), "archive", tree, *(f"specdec/{n}" for n in names)],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / "specdec"


def build(folder: Path, library: Path) -> ctypes.CDLL:
    """The kernels of the sources in `folder`, built as the runner builds its own, loaded."""
    cpu_kernels.build(cpu_kernels.c_compiler(), cpu_kernels.FLAGS + cpu_kernels.OPENMP, library,
                      tuple(folder / path.name for path in cpu_kernels.SOURCES))
    return ctypes.CDLL(str(library))


def _blocks(format: str, outs: int, inputs: int, generator: torch.Generator) -> PackedWeight:
    """Random weights [outs, inputs] rounded into `format`'s blocks, packed."""
    weight = torch.randn(outs, inputs, generator=generator) * 0.02
    return PackedWeight.of_blocks(ggml_blocks.quantized(weight, format))


def products(linears: dict[str, CpuLinear], rows: int, reps: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    layers = [[_blocks(ggml_blocks.Q4_1, *shape, generator) for shape in SHAPES] for _ in range(LAYERS)]
    head = _blocks(ggml_blocks.Q8_0, *HEAD, generator)
    inputs = {width: torch.randn(rows, width, generator=generator) for width in (576, 1536)}

    def step(linear: CpuLinear) -> torch.Tensor:
        for weights in layers:
            for weight in weights:
                linear(inputs[weight.inputs], weight)
        return linear(inputs[576], head)

    return _compare({name: (lambda linear=linear: step(linear)) for name, linear in linears.items()}, reps)


def attention(kernels: dict[str, CpuAttention], context: int, reps: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    caches = [(torch.randn(3, context, 64, generator=generator), torch.randn(3, context, 64, generator=generator))
              for _ in range(LAYERS)]
    q, lists = torch.randn(1, 9, 64, generator=generator), KeyLists([context], [[]])

    def step(kernel: CpuAttention) -> torch.Tensor:
        return torch.stack([kernel.attend(q, keys, values, lists, 0.125) for keys, values in caches])

    return _compare({name: (lambda kernel=kernel: step(kernel)) for name, kernel in kernels.items()}, reps)


def _compare(calls: dict, reps: int) -> dict:
    """Each call's median time in turns with the others, after checking they compute the same bits."""
    outputs = {name: call() for name, call in calls.items()}
    first = next(iter(outputs.values()))
    differing = [name for name, output in outputs.items() if not torch.equal(output, first)]
    if differing:
        raise SystemExit(f"these trees compute other bits than the first: {', '.join(differing)}")
    return {f"{name}_ms": ms for name, ms in medians_ms(calls, reps).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", default=["before=HEAD~1", "after=."],
                        help="name=tree pairs: a git revision of this repository, or a directory with specdec/*.c")
    parser.add_argument("--rows", default="1,8", help="rows of the products (comma-separated)")
    parser.add_argument("--context", type=int, default=1200, help="keys each layer's attention reads")
    parser.add_argument("--reps", type=int, default=25)
    args = parser.parse_args()
    trees = dict(pair.split("=", 1) for pair in args.trees)
    with tempfile.TemporaryDirectory() as scratch:
        libraries = {name: build(sources(tree, Path(scratch)), Path(scratch) / f"kernels-{i}.so")
                     for i, (name, tree) in enumerate(trees.items())}
        linears = {name: CpuLinear(library) for name, library in libraries.items()}
        kernels = {name: CpuAttention(library) for name, library in libraries.items()}
        rows = [{"rows": n, **products(linears, n, args.reps)} for n in (int(r) for r in args.rows.split(","))]
        report = {"trees": trees, "torch_threads": torch.get_num_threads(), "products": rows,
                  "attention": {"context": args.context, **attention(kernels, args.context, args.reps)}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
