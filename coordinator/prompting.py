"""Turning a user's turn into token ids: chat template (first turn or continuation) or raw."""

from __future__ import annotations

from typing import Sequence

from specdec.errors import InvalidArgument

# Stands in for the previous assistant answer when rendering a continuation turn.
_CUT = "\u2063SPECDEC-ASSISTANT-ANSWER\u2063"


def turn_tokens(tokenizer, prompt: str, raw: bool, history: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Token ids this turn appends to the session's committed tokens.

    Chat mode renders the model's chat template. For a continuation, only the text that
    follows the previous assistant answer is rendered (end of that answer, the new user turn,
    the generation prompt), so the cached prefix stays exactly as it was generated.
    """
    if raw:
        return list(tokenizer.encode(prompt, add_special_tokens=not history))
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("this model has no chat template; send the prompt with raw=true")
    if not history:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    rendered = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "-"},
            {"role": "assistant", "content": _CUT},
            {"role": "user", "content": prompt},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    tail = rendered.split(_CUT, 1)[1]
    if history[-1] in eos_ids:
        # The answer already ended with EOS; do not close it twice.
        eos_text = tokenizer.decode([history[-1]])
        if tail.startswith(eos_text):
            tail = tail[len(eos_text) :]
    return list(tokenizer.encode(tail, add_special_tokens=False))


def messages_tokens(tokenizer, messages: Sequence[dict]) -> list[int]:
    """A whole chat (system, user and assistant messages) through the chat template, ready for the
    assistant's next answer: what an OpenAI-style chat request asks for."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("this model has no chat template; send a raw prompt instead")
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))
