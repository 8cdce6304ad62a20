"""Tiny seeded random Llama models with a character-level tokenizer, built in a folder.

Fast enough to run hundreds of generations in a test, real enough to exercise the KV cache,
the logits, the chat template and every RPC. Two models built with the same characters share
a vocabulary (a draft/target pair); other seeds give different weights, so a drafter differs
from the target.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_CHARS = string.ascii_lowercase + string.digits + " \n.,!?'-:"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(chars: str = DEFAULT_CHARS):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(dict.fromkeys(chars)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    folder: Path,
    seed: int,
    chars: str = DEFAULT_CHARS,
    hidden: int = 32,
    layers: int = 2,
    max_context: int = 256,
    logit_scale: float = 1.0,
) -> Path:
    """Write a random Llama and its tokenizer to `folder`; return the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chars)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Sharper logits make greedy outputs less tie-prone and sampled ones less uniform.
        model.lm_head.weight.mul_(logit_scale)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
