"""`specdec train-draft`: train a feature drafter (specdec.eagle) for a target, the target frozen,
on data the target writes itself.

    specdec train-draft --target smollm2 --out drafters/smollm2-eagle3 --device cuda --minutes 6

1. Data (Magpie; Xu et al. 2024). The target is given its chat template's opening of a user turn
   (after it, sometimes, a generic opener such as "Explain" or "Translate into English:") and
   writes the instruction itself; then it answers its own instruction, greedily or at T = 0.7.
   Three kinds of conversation: `instruction` (that alone), `grounded` (--grounded of the
   batches: the target's own answer, a passage it wrote, is put in a new prompt with a task on
   it, "Summarize the following text:" and the like, so the drafter sees answers that copy from
   and refer to a long prompt) and `follow-up` (--follow-ups of the batches: a second user turn,
   "Can you give an example?" and the like, after the first answer); in --translations of the
   grounded batches the task is instead a translation of the passage into another language and
   the fourth kind, `translation`, asks for the target's own translation back into English, so
   the drafter sees English answers to prompts in other languages. No benchmark prompt is ever
   used. Saved to OUT/data.pt, so a resumed run reuses it.
2. Draft vocabulary: the target's most frequent output tokens (--draft-vocab); the card reports
   how much of the answers it covers.
3. Training: the target computes its features (the outputs of --feature-layers) and its
   distributions for every answer position; the drafter learns to match them (soft cross entropy
   over the draft vocabulary), unrolled --ttt-steps drafting steps on its own outputs (EAGLE-3's
   training-time test), later steps weighted 0.8^j. AdamW, warm-up then cosine over the time
   budget (--minutes), or over --max-steps when that is given (then the run's weights depend on
   the seed alone, not on the machine's speed; --minutes stays a hard stop). Checkpoints every
   --checkpoint-s to OUT/checkpoint.pt; --resume goes on from the last one. Seeded.
4. Held-out: chain drafting of 5 tokens from every answer position of greedy held-out
   conversations; the acceptance per position and the tokens a target step would yield go in
   the card (OUT/README.md) with the data size, steps, wall time and device.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from specdec import models
from specdec.eagle import DrafterConfig, EagleDrafter

OPENERS = [
    "", "", "", "", "Explain", "Write", "How do I", "What is", "Why", "Give me", "Describe", "Compare", "List",
    "Summarize the following text:", "Translate into English:", "Translate into French:", "Solve", "Calculate",
    "Write a short story about", "Write a poem about", "Write an email", "Rewrite this sentence", "Answer the question",
    "Help me", "Can you", "I need", "Tell me about", "What are the benefits of", "Create a plan for",
    "Classify", "Extract the", "Give three examples of", "Suggest", "Fix this code:", "Write a Python function",
    "In one paragraph,", "Step by step,", "Imagine you are", "What would happen if", "Read the passage and answer:",
]
# Openers of instructions whose answers become the passages of grounded conversations.
PASSAGE_OPENERS = [
    "Write a news article about", "Write a detailed report on", "Write an encyclopedia entry about",
    "Write a blog post about", "Describe in detail", "Write a short story about", "Explain in detail",
    "Write a product description for", "Write a biography of", "Write a history of",
]
# Tasks on a passage ({passage} is replaced by it).
GROUNDED_TASKS = [
    "Summarize the following text:\n\n{passage}", "{passage}\n\nSummarize the text above in a few sentences.",
    "Extract the names, places and numbers mentioned in this text:\n\n{passage}",
    "{passage}\n\nBased on the passage above, what is it mainly about?",
    "List the key points of the following text.\n\n{passage}",
    "Rewrite the following text in simpler words:\n\n{passage}", "Write a title for this text:\n\n{passage}",
    "Read the passage and answer the question.\n\nPassage: {passage}\n\nQuestion: Who or what is the passage "
    "about, and why does it matter?",
    "{passage}\n\nWhat are three facts stated in this text? Quote them.",
    "Translate the following text into French:\n\n{passage}",
]
FOLLOW_UPS = [
    "Can you explain that in more detail?", "Make it shorter.", "Can you give an example?", "Now write it as a list.",
    "Why is that?", "What else should I know?", "Rewrite your answer for a child.", "Are you sure? Check your answer.",
    "Thanks! Can you summarize your answer in one sentence?", "Continue.",
]
# Languages the grounded passages are translated into, and back out of.
LANGUAGES = ["French", "German", "Spanish", "Italian", "Portuguese", "Chinese", "Russian", "Japanese"]
KINDS = ("instruction", "grounded", "follow-up", "translation")  # data.pt stores the index: append only


@dataclass
class Conversation:
    prompt: list[int]  # chat-template tokens up to the assistant's turn
    answer: list[int]  # the target's own answer
    greedy: bool
    kind: str = "instruction"  # one of KINDS


@dataclass
class TrainOptions:
    target: str = "smollm2"
    out: Path = Path("drafters/draft")
    device: str = "cpu"
    minutes: float = 5.0  # training time (after the data)
    max_steps: int = 0  # > 0: stop after this many steps and schedule the learning rate by steps, not time
    conversations: int = 2000
    data_minutes: float = 5.0  # the data stops at this, or at `conversations`
    batch_conversations: int = 64  # generated together
    instruction_tokens: int = 64
    answer_tokens: int = 256
    grounded: float = 0.3  # share of data batches that also write grounded conversations
    follow_ups: float = 0.2  # share of data batches that also write a second turn
    translations: float = 0.3  # share of grounded batches whose task is a translation, then one back
    draft_vocab: int = 8192
    feature_layers: tuple[int, ...] = ()  # empty: EAGLE-3's low, middle and high (2, L/2, L-3)
    ttt_steps: int = 3
    batch_tokens: int = 16384  # tokens a training step
    max_length: int = 1024
    lr: float = 5e-4
    seed: int = 0
    checkpoint_s: float = 60.0
    resume: bool = False
    heldout_fraction: float = 0.05
    data: str = ""  # train on this data.pt instead of writing new data
    init: str = ""  # start from this drafter's weights and draft vocabulary (fine-tuning) instead of at random
    progress: bool = True


def default_feature_layers(layers: int) -> tuple[int, ...]:
    """EAGLE-3's choice: a low, a middle and a high layer's output."""
    return tuple(sorted({min(2, layers), max(1, layers // 2), max(1, layers - 3)}))


# --- 1. data the target writes --------------------------------------------------------------


def user_turn_prefix(tokenizer) -> str:
    """The chat template's text before a user message's content."""
    marker = "\u2063SPECDEC\u2063"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return rendered.split(marker, 1)[0]


@torch.inference_mode()
def _generate(model, tokenizer, prompts: list[list[int]], max_new: int, temperature: float, eos: list[int],
              device: str) -> list[list[int]]:
    """Continue each prompt (left-padded batch); each continuation cut after its first EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new, eos_token_id=eos,
                         pad_token_id=pad, **sampling)
    continuations = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        continuations.append(row[:cut])
    return continuations


def _chat(tokenizer, turns: list[str], options: TrainOptions) -> list[int]:
    """The chat template's tokens of alternating user / assistant turns, up to the next answer."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)[-(options.max_length // 2):]


def _instructions(model, tokenizer, openers: list[str], options: TrainOptions, eos: list[int]) -> list[str]:
    """Instructions the target writes after the user turn's opening and each opener."""
    prefix = user_turn_prefix(tokenizer)
    starts = [tokenizer.encode(prefix + opener + (" " if opener else ""), add_special_tokens=False)
              for opener in openers]
    tails = _generate(model, tokenizer, starts, options.instruction_tokens, 1.0, eos, options.device)
    texts = [((opener + " " if opener else "") + tokenizer.decode(tail, skip_special_tokens=True)).strip()
             for opener, tail in zip(openers, tails)]
    return [text for text in texts if len(text) >= 8]


def _answer(model, tokenizer, dialogues: list[list[str]], kind: str, greedy: bool, options: TrainOptions,
            eos: list[int]) -> list[tuple[list[str], Conversation]]:
    """The target's answers to dialogues (user turns first, alternating): each dialogue with its
    answer appended, and the Conversation it makes (answers of fewer than 4 tokens dropped)."""
    prompts = [_chat(tokenizer, turns, options) for turns in dialogues]
    answers = _generate(model, tokenizer, prompts, options.answer_tokens, 0.0 if greedy else 0.7, eos, options.device)
    return [(turns + [tokenizer.decode(answer, skip_special_tokens=True).strip()],
             Conversation(prompt, answer, greedy, kind))
            for turns, prompt, answer in zip(dialogues, prompts, answers) if len(answer) >= 4]


def _grounded(model, tokenizer, passages: list[str], options: TrainOptions, rng: random.Random,
              eos: list[int]) -> list[tuple[list[str], Conversation]]:
    """Grounded conversations on passages the target wrote: a task on each (GROUNDED_TASKS), or,
    in --translations of the batches, its translation into one of LANGUAGES and then, as
    `translation` conversations, the target's translation of that back into English."""
    if rng.random() >= options.translations:
        tasks = [[rng.choice(GROUNDED_TASKS).format(passage=passage)] for passage in passages]
        return _answer(model, tokenizer, tasks, "grounded", rng.random() < 0.5, options, eos)
    tasks = [[f"Translate the following text into {rng.choice(LANGUAGES)}:\n\n{passage}"] for passage in passages]
    translated = _answer(model, tokenizer, tasks, "grounded", rng.random() < 0.5, options, eos)
    back = [[f"Translate the following text into English:\n\n{turns[-1]}"] for turns, _ in translated]
    return translated + _answer(model, tokenizer, back, "translation", rng.random() < 0.5, options, eos)


def synthesize(model, tokenizer, options: TrainOptions, rng: random.Random, log) -> list[Conversation]:
    """Instructions the target writes itself and its answers to them; for some batches, grounded
    conversations (a task on a passage the target wrote, or its translation and back) and second
    turns (KINDS)."""
    eos = models.eos_token_ids(model, tokenizer)
    conversations: list[Conversation] = []
    deadline = time.monotonic() + 60 * options.data_minutes
    bar = tqdm(total=options.conversations, desc="data", unit="conv", disable=not options.progress)
    while len(conversations) < options.conversations and time.monotonic() < deadline:
        grounded = rng.random() < options.grounded
        pool = PASSAGE_OPENERS if grounded else OPENERS
        instructions = _instructions(model, tokenizer, [rng.choice(pool) for _ in range(options.batch_conversations)],
                                     options, eos)
        if not instructions:
            continue
        made = _answer(model, tokenizer, [[text] for text in instructions], "instruction", rng.random() < 0.5,
                       options, eos)
        if grounded and made:
            made += _grounded(model, tokenizer, [turns[-1] for turns, _ in made], options, rng, eos)
        if rng.random() < options.follow_ups and made:
            dialogues = [turns + [rng.choice(FOLLOW_UPS)] for turns, _ in made]
            made += _answer(model, tokenizer, dialogues, "follow-up", rng.random() < 0.5, options, eos)
        conversations += [conversation for _, conversation in made]
        bar.update(min(len(made), bar.total - bar.n))
        log(f"data: {len(conversations)} conversations")
    bar.close()
    return conversations[: options.conversations]


def save_conversations(path: Path, conversations: list[Conversation], seconds: float) -> None:
    """Compactly: all tokens as one int32 tensor, with each conversation's lengths."""
    tokens = [t for c in conversations for t in c.prompt + c.answer]
    torch.save({"tokens": torch.tensor(tokens, dtype=torch.int32),
                "lengths": torch.tensor([[len(c.prompt), len(c.answer), int(c.greedy), KINDS.index(c.kind)]
                                         for c in conversations], dtype=torch.int32).reshape(-1, 4),
                "seconds": seconds}, path)


def load_conversations(path: Path) -> tuple[list[Conversation], float]:
    saved = torch.load(path)
    tokens, at, conversations = saved["tokens"].tolist(), 0, []
    for prompt, answer, greedy, *kind in saved["lengths"].tolist():  # data of older runs has no kind
        conversations.append(Conversation(tokens[at : at + prompt], tokens[at + prompt : at + prompt + answer],
                                          bool(greedy), KINDS[kind[0]] if kind else KINDS[0]))
        at += prompt + answer
    return conversations, float(saved["seconds"])


def draft_vocabulary(conversations: list[Conversation], size: int, eos: list[int]) -> tuple[list[int], float]:
    """The most frequent answer tokens (EOS always in), and the share of answer tokens they cover."""
    counts = _answer_counts(conversations)
    chosen = sorted(list(dict.fromkeys(list(eos) + [t for t, _ in counts.most_common(size)]))[:size])
    return chosen, _covered(counts, chosen)


def vocabulary_coverage(conversations: list[Conversation], draft_ids: list[int]) -> float:
    """The share of the answers' tokens that are in a draft vocabulary."""
    return _covered(_answer_counts(conversations), draft_ids)


def _answer_counts(conversations: list[Conversation]) -> Counter:
    return Counter(t for c in conversations for t in c.answer)


def _covered(counts: Counter, draft_ids: list[int]) -> float:
    return sum(counts[t] for t in draft_ids) / max(1, sum(counts.values()))


# --- 2. the target's view of a batch -------------------------------------------------------


class TargetView:
    """The frozen target: per position, its features (chosen layers' outputs) and distribution."""

    def __init__(self, model, layers: tuple[int, ...], vocab: int):
        self.model, self.layers, self.vocab = model, layers, vocab
        self._captured: dict[int, torch.Tensor] = {}
        decoder = model.get_decoder()
        for layer in layers:
            module = decoder.embed_tokens if layer == 0 else decoder.layers[layer - 1]
            module.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def keep(module, inputs, output):
            self._captured[layer] = output[0] if isinstance(output, tuple) else output
        return keep

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=ids, attention_mask=mask).logits[..., : self.vocab]
        features = torch.cat([self._captured[layer] for layer in self.layers], dim=-1)
        return features.float(), logits.float()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.get_input_embeddings()(ids).float()


def split_heldout(conversations: list[Conversation], fraction: float, seed: int):
    """(held out, training), a function of the data and the seed only: a resumed run, or one given
    --data, holds out the same conversations as the run that wrote the data."""
    order = list(conversations)
    random.Random(f"heldout-{seed}").shuffle(order)
    held = max(1, int(len(order) * fraction))
    return order[:held], order[held:] or order


def length_batches(conversations: list[Conversation], batch_tokens: int, max_length: int, rng: random.Random):
    """Lists of conversations of similar length, about batch_tokens tokens each, forever."""
    order = sorted(range(len(conversations)), key=lambda i: len(conversations[i].prompt) + len(conversations[i].answer))
    while True:
        groups, group, longest = [], [], 0
        for i in order:
            length = min(max_length, len(conversations[i].prompt) + len(conversations[i].answer))
            if group and max(longest, length) * (len(group) + 1) > batch_tokens:
                groups.append(group)
                group, longest = [], 0
            group.append(i)
            longest = max(longest, length)
        if group:
            groups.append(group)
        rng.shuffle(groups)
        yield from groups


def batch_tensors(conversations: list[Conversation], max_length: int, device: str):
    """ids, attention mask, loss mask (answer positions that have a next token), [B, T]."""
    rows = [(c.prompt + c.answer)[:max_length] for c in conversations]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros_like(ids)
    loss = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, c) in enumerate(zip(rows, conversations)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        # Row p predicts token p + 1: the answer's tokens are predicted from prompt_len - 1 on.
        loss[i, max(0, len(c.prompt) - 1) : len(row) - 1] = True
    return ids.to(device), attention.to(device), loss.to(device)


def step_losses(drafter: EagleDrafter, target: TargetView, batch: list[Conversation], options: TrainOptions,
                d2t: torch.Tensor) -> list[torch.Tensor]:
    """draft_losses of a batch of conversations, the target run on them."""
    ids, attention, mask = batch_tensors(batch, options.max_length, options.device)
    features, logits = target(ids, attention)
    return draft_losses(drafter, target.embed(ids), features, logits, mask, options.ttt_steps, d2t)


def draft_losses(drafter: EagleDrafter, embeddings: torch.Tensor, features: torch.Tensor, logits: torch.Tensor,
                 mask: torch.Tensor, steps: int, d2t: torch.Tensor) -> list[torch.Tensor]:
    """Soft cross entropy of each of `steps` unrolled steps against the target's distribution
    (logits [B, T, V]) restricted to the draft vocabulary, over the positions in mask [B, T]."""
    p = torch.softmax(logits, dim=-1)[..., d2t]
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-9)
    losses = []
    outputs = drafter.unrolled(embeddings, features, steps)
    for step, draft_logits in enumerate(outputs, start=1):
        valid = mask.clone()
        valid[:, : step - 1] = False  # the chain would start before position 0
        log_q = torch.log_softmax(draft_logits.float(), dim=-1)
        per_position = -(p * log_q).sum(-1)
        losses.append((per_position * valid).sum() / valid.sum().clamp_min(1))
    return losses


# --- 3. held-out acceptance -----------------------------------------------------------------


@torch.no_grad()
def chain_tallies(drafters: Sequence[tuple[EagleDrafter, torch.Tensor | None]], target: TargetView,
                  conversations: list[Conversation], options: TrainOptions, depth: int,
                  batch_size: int = 8) -> list[list[tuple[int, list[int]]]]:
    """Per drafter (with the columns of the target's features it reads; None: all of them), per
    conversation: the answer positions a chain of `depth` greedy drafts starts from, and for each j
    how many of those chains have their first j + 1 drafts equal to the target's greedy tokens.
    One target pass per batch serves every drafter."""
    tallies: list[list[tuple[int, list[int]]]] = [[] for _ in drafters]
    for i in range(0, len(conversations), batch_size):
        ids, attention, mask = batch_tensors(conversations[i : i + batch_size], options.max_length, options.device)
        features, logits = target(ids, attention)
        wanted, embeddings = logits.argmax(-1), target.embed(ids)
        del logits
        for tally, (drafter, columns) in zip(tallies, drafters):
            read = features if columns is None else features[..., columns]
            accepted = chain_hits(drafter, embeddings, read, wanted, mask, depth)
            tally += [(int(mask[row].sum()), accepted[row].tolist()) for row in range(len(ids))]
    return tallies


@torch.no_grad()
def chain_hits(drafter: EagleDrafter, embeddings: torch.Tensor, features: torch.Tensor, wanted: torch.Tensor,
               mask: torch.Tensor, depth: int) -> torch.Tensor:
    """[B, depth]: per row, how many chains of greedy drafts starting at a position in mask [B, T]
    have their first j + 1 drafts equal to `wanted` [B, T] (the target's greedy token after each
    position)."""
    outputs = drafter.unrolled(embeddings, features, depth)
    length = embeddings.shape[1]
    accepted = torch.zeros((embeddings.shape[0], depth), dtype=torch.long, device=embeddings.device)
    alive = torch.ones_like(mask, dtype=torch.bool)  # [B, start]: the chain from start kept its drafts so far
    for j, output in enumerate(outputs):
        # Step j's output at position p drafts the token after p, for the chain that started at p - j.
        kept = mask & (drafter.d2t[output.argmax(-1)] == wanted)
        from_start = torch.zeros_like(kept)
        from_start[:, : length - j] = kept[:, j:]
        alive &= from_start
        accepted[:, j] = alive.sum(1)
    return accepted


def acceptance_summary(tallies: list[tuple[int, list[int]]], depth: int) -> dict:
    """Chains' P(the first j drafts are all kept), j = 1..depth, and the tokens a step yields."""
    starts = sum(s for s, _ in tallies)
    by_position = [sum(a[j] for _, a in tallies) / max(1, starts) for j in range(depth)]
    return {"starts": starts, "acceptance_by_position": by_position, "tokens_per_step_k5": 1 + sum(by_position)}


def heldout_acceptance(drafter: EagleDrafter, target: TargetView, conversations: list[Conversation],
                       options: TrainOptions, depth: int = 5) -> dict:
    """Chain drafting of `depth` greedy tokens from every answer position of greedy conversations
    (all of them if none is greedy): P(the first j drafts all equal the target's greedy tokens),
    and tokens per target step; the same per kind of conversation (`by_kind`). Each conversation
    is run once, whatever figures it counts in."""
    chosen = lambda group: [c for c in group if c.greedy] or group  # noqa: E731
    kinds = {kind: chosen([c for c in conversations if c.kind == kind]) for kind in KINDS}
    overall = chosen(conversations)
    evaluated = list({id(c): c for c in overall + [c for group in kinds.values() for c in group]}.values())
    tally = dict(zip(map(id, evaluated), chain_tallies([(drafter, None)], target, evaluated, options, depth)[0]))
    summary = lambda group: acceptance_summary([tally[id(c)] for c in group], depth)  # noqa: E731
    return {**summary(overall), "by_kind": {kind: summary(group) for kind, group in kinds.items() if group}}


# --- 4. the loop ----------------------------------------------------------------------------


@dataclass
class Checkpoint:
    step: int = 0
    trained_s: float = 0.0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)


def train(options: TrainOptions, log=print) -> dict:
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = models.load_tokenizer(options.target)
    model = models.load_model(options.target, device=options.device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    vocab = len(tokenizer)
    layers = options.feature_layers or default_feature_layers(model.config.num_hidden_layers)
    initial = _initial_drafter(options.init, layers, tokenizer) if options.init else None  # checked before the data
    data_file = out / "data.pt"
    if (options.resume or options.data) and (Path(options.data) if options.data else data_file).is_file():
        conversations, data_s = load_conversations(Path(options.data) if options.data else data_file)
        log(f"data: {len(conversations)} conversations")
    else:
        begun = time.perf_counter()
        conversations = synthesize(model, tokenizer, options, rng, log)
        data_s = time.perf_counter() - begun
        save_conversations(data_file, conversations, data_s)
    heldout, training = split_heldout(conversations, options.heldout_fraction, options.seed)
    eos = models.eos_token_ids(model, tokenizer)
    if initial is not None:
        drafter, config, draft_ids = initial.to(options.device), initial.config, initial.d2t.tolist()
        coverage = vocabulary_coverage(training, draft_ids)
    else:
        draft_ids, coverage = draft_vocabulary(training, min(options.draft_vocab, vocab), eos)
        config = DrafterConfig.for_target(model.config, options.target, models.vocab_fingerprint(tokenizer), vocab,
                                          len(draft_ids), list(layers))
        drafter = EagleDrafter(config).to(options.device)
        drafter.d2t.copy_(torch.tensor(draft_ids))
    d2t = drafter.d2t
    optimizer = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=options.lr,
                                  betas=(0.9, 0.95), weight_decay=0.0)
    state = Checkpoint()
    checkpoint_file = out / "checkpoint.pt"
    if options.resume and checkpoint_file.is_file():
        saved = torch.load(checkpoint_file, weights_only=False)
        drafter.load_state_dict(saved["drafter"])
        optimizer.load_state_dict(saved["optimizer"])
        state = Checkpoint(**saved["state"])
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        log(f"resumed at step {state.step} ({state.trained_s:.0f} s trained)")
    target = TargetView(model, tuple(layers), vocab)
    budget = 60 * options.minutes
    batches = length_batches(training, options.batch_tokens, options.max_length, rng)
    for _ in range(state.step):  # the same order of batches as an uninterrupted run
        next(batches)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if options.device.startswith("cuda") \
        else torch.autocast("cpu", enabled=False)
    weights = [0.8**j for j in range(options.ttt_steps)]
    by_steps = options.max_steps > 0
    bar = tqdm(total=options.max_steps if by_steps else round(budget), desc="train", unit="step" if by_steps else "s",
               disable=not options.progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} " + ("steps" if by_steps else "s")
               + " [{elapsed}<{remaining}] {postfix}")
    bar.update(min(bar.total, state.step if by_steps else state.trained_s))
    last_checkpoint = time.monotonic()
    drafter.train()
    while state.trained_s < budget and not (by_steps and state.step >= options.max_steps):
        tick = time.perf_counter()
        batch = [training[i] for i in next(batches)]
        progress = state.step / options.max_steps if by_steps else state.trained_s / budget
        lr = options.lr * min(1.0, (state.step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            losses = step_losses(drafter, target, batch, options, d2t)
        loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        state.step += 1
        state.tokens_seen += sum(len(c.prompt) + len(c.answer) for c in batch)
        state.losses.append(loss.item())
        spent = time.perf_counter() - tick
        state.trained_s += spent
        bar.update(min(1 if by_steps else spent, bar.total - bar.n))
        bar.set_postfix_str(f"step {state.step} loss {state.losses[-1]:.3f}")
        if time.monotonic() - last_checkpoint > options.checkpoint_s:
            _save_checkpoint(checkpoint_file, drafter, optimizer, state, rng)
            last_checkpoint = time.monotonic()
    bar.close()
    _save_checkpoint(checkpoint_file, drafter, optimizer, state, rng)
    drafter.eval()
    with autocast:
        evaluation = heldout_acceptance(drafter, target, heldout, options)
    answer_tokens = sum(len(c.answer) for c in conversations)
    config.training = {
        "target": options.target, "device": options.device,
        "device_name": torch.cuda.get_device_name(0) if options.device.startswith("cuda") else "cpu",
        "conversations": len(conversations), "heldout_conversations": len(heldout),
        "answer_tokens": answer_tokens, "data_seconds": round(data_s, 1), "steps": state.step,
        "train_seconds": round(state.trained_s, 1), "tokens_seen": state.tokens_seen,
        "epochs": round(state.tokens_seen / max(1, sum(len(c.prompt) + len(c.answer) for c in training)), 2),
        "feature_layers": list(layers), "ttt_steps": options.ttt_steps, "draft_vocab": len(draft_ids),
        "draft_vocab_coverage": round(coverage, 4), "final_loss": round(sum(state.losses[-20:]) / max(1, len(state.losses[-20:])), 4),
        "seed": options.seed, "heldout": evaluation, "wall_seconds": round(time.perf_counter() - started, 1),
        "kinds": dict(Counter(c.kind for c in conversations)), "initialised_from": options.init or None,
    }
    drafter.config = config
    drafter.save(out)
    (out / "README.md").write_text(card(config))
    log(json.dumps(config.training))
    return config.training


def _initial_drafter(folder: str, layers: tuple[int, ...], tokenizer) -> EagleDrafter:
    """A drafter to fine-tune (its weights and draft vocabulary), checked against the target."""
    drafter = EagleDrafter.load(Path(folder))
    config = drafter.config
    if config.vocab_fingerprint != models.vocab_fingerprint(tokenizer):
        raise ValueError(f"--init {folder} was trained for another tokenizer than this target's")
    if tuple(config.feature_layers) != tuple(layers):
        raise ValueError(f"--init {folder} fuses layers {config.feature_layers}, not {list(layers)}")
    return drafter


def _save_checkpoint(path: Path, drafter, optimizer, state: Checkpoint, rng: random.Random) -> None:
    staging = path.with_suffix(".tmp")
    torch.save({"drafter": drafter.state_dict(), "optimizer": optimizer.state_dict(), "state": state.__dict__,
                "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, staging)
    staging.replace(path)


def card(config: DrafterConfig) -> str:
    t = config.training
    heldout = t["heldout"]
    by_position = " ".join(f"{a:.3f}" for a in heldout["acceptance_by_position"])
    kinds = "".join(f"; {n} {kind}" for kind, n in t.get("kinds", {}).items())
    return f"""# Feature drafter (EAGLE-3) for `{config.target}`

Trained by `specdec train-draft` with the target frozen, on data the target wrote itself.

| | |
|---|---|
| target | `{config.target}` (vocabulary fingerprint `{config.vocab_fingerprint[:16]}...`) |
| architecture | fused target features of layers {config.feature_layers} -> one decoder layer ({config.hidden_size} wide, {config.num_attention_heads} heads) -> LM head over {config.draft_vocab_size} draft tokens |
| data | {t['conversations']} self-written conversations ({t['heldout_conversations']} held out{kinds}), {t['answer_tokens']} answer tokens, made in {t['data_seconds']} s |
| draft vocabulary | {config.draft_vocab_size} tokens, covering {100 * t['draft_vocab_coverage']:.1f}% of the answers' tokens |
| training | {t['steps']} steps, {t['tokens_seen']} tokens seen ({t['epochs']} epochs), {t['train_seconds']} s, training-time test of {t['ttt_steps']} steps, seed {t['seed']} |
| device | {t['device']} ({t['device_name']}) |
| final loss | {t['final_loss']} |
| held-out acceptance by position (greedy chains of 5 from {heldout['starts']} positions) | {by_position} |
| held-out tokens per target step at k = 5 | {heldout['tokens_per_step_k5']:.2f} |
""" + "".join(f"| held-out tokens per target step at k = 5, {kind} conversations | {e['tokens_per_step_k5']:.2f} |\n"
              for kind, e in heldout.get("by_kind", {}).items()) + (
        f"| initialised from | `{t['initialised_from']}` |\n" if t.get("initialised_from") else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2", help="the target model (frozen)")
    parser.add_argument("--out", required=True, help="folder to write the drafter to")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget (after the data)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop after this many steps, the learning rate scheduled by steps (a run that "
                        "depends on the seed alone); --minutes stays a hard stop")
    parser.add_argument("--conversations", type=int, default=2000, help="conversations the target writes")
    parser.add_argument("--data-minutes", type=float, default=5.0, help="time budget for writing them")
    parser.add_argument("--batch-conversations", type=int, default=64, help="conversations generated at once")
    parser.add_argument("--answer-tokens", type=int, default=256, help="longest answer")
    parser.add_argument("--grounded", type=float, default=0.3,
                        help="share of data batches that also write grounded conversations (a task on a passage)")
    parser.add_argument("--follow-ups", type=float, default=0.2,
                        help="share of data batches that also write a second user turn and its answer")
    parser.add_argument("--translations", type=float, default=0.3,
                        help="share of grounded batches that translate the passage into another language and "
                        "then back into English")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size")
    parser.add_argument("--feature-layers", default="", help="comma-separated hidden-state indices (default: EAGLE-3's)")
    parser.add_argument("--ttt-steps", type=int, default=3, help="drafting steps unrolled in training")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="tokens a training step")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-s", type=float, default=60.0, help="seconds between checkpoints")
    parser.add_argument("--resume", action="store_true", help="go on from OUT's data and last checkpoint")
    parser.add_argument("--data", default="", help="train on this data.pt (written by an earlier run) instead")
    parser.add_argument("--init", default="", help="fine-tune this drafter folder (its weights and draft vocabulary) "
                        "instead of starting at random")
    parser.add_argument("--no-progress", action="store_true")


def options_from(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(
        target=args.target, out=Path(args.out), device=args.device, minutes=args.minutes,
        max_steps=args.max_steps,
        conversations=args.conversations, data_minutes=args.data_minutes,
        batch_conversations=args.batch_conversations, answer_tokens=args.answer_tokens, grounded=args.grounded,
        follow_ups=args.follow_ups, translations=args.translations, draft_vocab=args.draft_vocab,
        feature_layers=tuple(int(x) for x in args.feature_layers.split(",") if x.strip()),
        ttt_steps=args.ttt_steps, batch_tokens=args.batch_tokens, max_length=args.max_length, lr=args.lr,
        seed=args.seed, checkpoint_s=args.checkpoint_s, resume=args.resume, data=args.data, init=args.init,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m specdec.train_draft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    train(options_from(parser.parse_args()), log=lambda line: print(line, flush=True))
