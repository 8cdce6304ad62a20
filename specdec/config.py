"""Typed configuration read once at start-up from flags, then environment variables, then defaults.

Each service declares a frozen dataclass; every field becomes a flag `--field-name` and an
environment variable `<PREFIX>FIELD_NAME` (e.g. SPECDEC_TARGET_MODEL), both listed in `--help` with the field's help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its help text (shown in --help)."""
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def compile_option(what: str) -> Any:
    """--compile of a service that runs a model (`what`: whose dense stages)."""
    return option("auto", f"torch.compile {what} dense stages (CUDA graphs on CUDA), warmed up at start-up: 'on', "
                  "'off', or 'auto' (on for CUDA devices, off on CPU, where it measured no faster)", negation="off")


def cpu_kernels_option(more: str = "") -> Any:
    """--cpu-kernels of a service that runs a model (`more`: what else it covers there)."""
    return option("auto", "attention and matrix products on CPU (float32): 'c' (the C kernels, built at start-up "
                  "with the machine's C compiler; refuse to start without them), 'torch' (torch's attention blocks "
                  "and oneDNN's products), or 'auto' (C where they build, else torch with a warning). The two differ "
                  "in the last bits: replicas that take over each other's sessions must run the same one" + more)


def gguf_blocks_option() -> Any:
    """--gguf-blocks of a service that runs a model."""
    return option(True, "on CPU with the C products: weights that are exactly a .gguf file's GGML blocks (Q4_1, "
                  "Q8_0) dequantized are read in those blocks (a sixth of float32's bytes for Q4_1), with the same "
                  "bits; false: read float32 (to measure the difference)", negation=False)


def batch_invariant_option() -> Any:
    """--batch-invariant of a service that runs a model."""
    return option(True, "numbers that do not depend on batching or chunking, so seeded output survives batching "
                  "and failover (the C products are so by construction; oneDNN's and F.linear's pad rows to a "
                  "multiple of 4 and run in pieces); false: single-token steps of those run unpadded (faster where "
                  "the BLAS has a faster one-row kernel: F.linear on CPU; bitwise reproducibility lost)",
                  negation=False)


def env_name(prefix: str, field_name: str) -> str:
    return prefix + field_name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _converter(kind: Any):
    if kind is bool:
        return _parse_bool
    if kind in (int, float, str):
        return kind
    if typing.get_origin(kind) is tuple:
        return _parse_list
    raise TypeError(f"unsupported config field type {kind}")


def parse_config(
    cls: type[T], argv: Sequence[str] | None, description: str, env_prefix: str, prog: str | None = None
) -> T:
    """Build `cls` from argv and the environment. Flags win over environment over defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        convert = _converter(kind)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        env = env_name(env_prefix, f.name)
        if env in os.environ:
            default = convert(os.environ[env])
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=convert,
            default=default,
            metavar=f.name.upper() if kind is not bool else "BOOL",
            help=f"{f.metadata.get('help', '')} [env {env}; default: {shown!r}]",
        )
        if "negation" in f.metadata:  # e.g. --no-compile for --compile off
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const",
                                const=f.metadata["negation"], help=f"same as --{f.name.replace('_', '-')} "
                                f"{f.metadata['negation']}")
    args = parser.parse_args(argv)
    return cls(**vars(args))


def default_prompts_file():
    """Spec-Bench prompts, beside the repository (../shared/data)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "specbench-dev.jsonl"


def flag_table(cls: type, env_prefix: str) -> str:
    """The README's markdown table of a config's flags (`python -m specdec.config` prints all)."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(default) if isinstance(default, tuple) else default
        flag = f"--{f.name.replace('_', '-')}"
        if "negation" in f.metadata:
            flag += f"`, `--no-{f.name.replace('_', '-')}"
        rows.append(f"| `{flag}` | `{env_name(env_prefix, f.name)}` | `{shown}` | "
                    f"{f.metadata.get('help', '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    from coordinator.config import CoordinatorConfig
    from draft_service.config import DraftConfig
    from target_service.config import TargetConfig

    for title, config, prefix in (("coordinator", CoordinatorConfig, "SPECDEC_COORDINATOR_"),
                                  ("target_service", TargetConfig, "SPECDEC_TARGET_"),
                                  ("draft_service", DraftConfig, "SPECDEC_DRAFT_")):
        print(f"#### `python -m {title}`\n\n{flag_table(config, prefix)}\n")
