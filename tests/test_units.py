"""Plain building blocks: n-gram lookup, KV-cache crop/extend, deltas, text stream, codec, config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specdec.ngram import ngram_lookup
from specdec import models
from specdec.config import option, parse_config
from specdec.errors import CacheMiss, InvalidArgument
from specdec.kv_cache import SessionCache, SessionCacheTable, committed_tokens
from specdec.runner import ForwardJob, ModelRunner
from specdec.prefix import prefix_digest
from specdec.wire import ContextDelta
from specdec.tensor_codec import decode_tensor, encode_tensor
from specdec.v1 import common_pb2
from coordinator.text_stream import TextStream
from tiny_models import build_tokenizer


def test_ngram_lookup_is_its_definition_on_random_sequences():
    """Longest suffix of n in [min_ngram, max_ngram] tokens that occurred earlier, its latest
    occurrence, the k tokens after it: written out by brute force, on small alphabets (many
    matches, overlapping ones, matches at the very start)."""
    import random

    def definition(seq, k, max_ngram, min_ngram):
        for n in range(min(max_ngram, len(seq) - 1), max(min_ngram, 1) - 1, -1):
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == seq[len(seq) - n :]:
                    return seq[start + n : start + n + k]
        return []

    chance = random.Random(7)
    for _ in range(3000):
        seq = [chance.randrange(chance.choice([2, 3, 6, 40])) for _ in range(chance.randrange(0, 30))]
        k, max_ngram, min_ngram = chance.randrange(1, 6), chance.randrange(0, 9), chance.randrange(0, 4)
        assert ngram_lookup(seq, k, max_ngram, min_ngram) == definition(seq, k, max_ngram, min_ngram)


def test_ngram_lookup_copies_what_followed_the_latest_match():
    assert ngram_lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], k=2) == [7, 8]
    assert ngram_lookup([5, 6, 7, 5, 6], k=4) == [7, 5, 6]  # continuation runs into the suffix
    assert ngram_lookup([4, 1, 2, 3], k=3) == []  # nothing repeats
    assert ngram_lookup([1, 2, 1], k=5, max_ngram=3) == [2, 1]  # falls back to a 1-gram
    assert ngram_lookup([7], k=3) == []


@pytest.fixture(scope="module")
def runner(tiny_target):
    model = models.load_model(str(tiny_target))
    return ModelRunner(model, vocab_size=model.config.vocab_size)


def test_crop_and_extend_equals_a_fresh_forward(runner):
    torch.manual_seed(0)
    prefix = torch.randint(0, runner.vocab_size, (30,)).tolist()
    branch_a = prefix + [5, 6, 7, 8]
    branch_b = prefix + [5, 9, 10]
    entry = SessionCache()
    runner.forward([ForwardJob(entry, branch_a, 29)])
    capacity = entry.kv.capacity
    rolled_back = runner.forward([ForwardJob(entry, branch_b, 29)])[0]  # rejection: roll back to prefix+[5]
    assert rolled_back.reused == 29  # capped at `first`: positions whose logits are needed are recomputed
    assert entry.kv.capacity == capacity, "a rollback moves a length, it does not reallocate"
    fresh = runner.forward([ForwardJob(SessionCache(), branch_b, 29)])[0]
    assert torch.equal(rolled_back.logits, fresh.logits)
    assert entry.tokens == branch_b and entry.kv_len == len(branch_b)


def test_a_session_cache_grows_by_doubling_and_keeps_its_positions(runner):
    kv = runner.new_kv(10)
    assert kv.capacity == 64 and kv.nbytes == kv.data.numel() * 4
    kv.data[..., :5, :] = 1.0
    kv.length = 5
    kv.reserve(65)
    assert kv.capacity == 128 and kv.length == 5
    assert torch.equal(kv.span(0, 5), torch.ones_like(kv.span(0, 5)))


def test_a_restarted_cache_holds_positions_from_its_start_and_nothing_once_cropped_below_it(runner):
    kv = runner.new_kv(10)
    kv.restart(100)  # past its capacity
    assert (kv.start, kv.length) == (100, 100) and kv.capacity >= 100
    kv.data[..., 100:105, :] = 1.0
    kv.length = 105
    kv.reserve(2 * kv.capacity)  # grown: what it holds moves along
    assert torch.equal(kv.span(100, 105), torch.ones_like(kv.span(100, 105)))
    kv.crop(102)  # a rollback within what it holds
    assert (kv.start, kv.length) == (100, 102)
    kv.crop(30)  # below its start: nothing it holds is left, and nothing before it was ever held
    assert (kv.start, kv.length) == (0, 0)


def _context(committed: list[int], start: int, digest_of: list[int] | None = None) -> ContextDelta:
    return ContextDelta("s", len(committed), start, tuple(committed[start:]), prefix_digest(digest_of or committed))


def test_delta_builds_on_the_cached_prefix_or_asks_for_everything():
    entry = SessionCache(tokens=[1, 2, 3, 99])  # 99 was a draft token
    assert committed_tokens(entry, _context([1, 2, 3, 4, 5], 3)) == [1, 2, 3, 4, 5]
    assert entry.digest.length == 5 and entry.digest.digest() == prefix_digest([1, 2, 3, 4, 5])
    with pytest.raises(CacheMiss, match="delta_start=0") as miss:
        committed_tokens(SessionCache(tokens=[1, 2]), _context([1, 2, 3, 4], 3))
    assert "2" not in str(miss.value), "a miss must not say how much the replica holds"
    with pytest.raises(InvalidArgument):
        committed_tokens(SessionCache(tokens=[1, 2, 3]), ContextDelta("s", 7, 1, (4,), prefix_digest([1, 4])))


def test_a_cache_whose_tokens_are_not_the_sessions_is_a_miss_not_trusted():
    poisoned = SessionCache(tokens=[1, 2, 7, 8])  # someone else's tokens under this session's id
    with pytest.raises(CacheMiss):
        committed_tokens(poisoned, _context([1, 2, 3, 4, 5], 4))
    # The whole sequence, with its digest, is always accepted (and proves the new prefix)...
    assert committed_tokens(poisoned, _context([1, 2, 3, 4, 5], 0)) == [1, 2, 3, 4, 5]
    # ...but not a digest that does not match the tokens sent.
    with pytest.raises(InvalidArgument, match="prefix_digest"):
        committed_tokens(SessionCache(), _context([1, 2, 3], 0, digest_of=[9, 9, 9]))
    # A cache proven earlier is extended without rehashing, and still checked.
    entry = SessionCache(tokens=[1, 2, 3])
    committed_tokens(entry, _context([1, 2, 3], 0))
    entry.tokens = [1, 2, 3, 50]
    with pytest.raises(CacheMiss):
        committed_tokens(entry, _context([1, 2, 3, 4], 3, digest_of=[1, 2, 4, 4]))


def test_common_prefix_len_finds_the_first_difference_wherever_it_is():
    """The shared prefix's length, as a token-by-token scan finds it, for lists of any lengths
    that differ anywhere (or nowhere), across the spans it halves."""
    import random

    from specdec.kv_cache import PREFIX_SPAN, common_prefix_len

    rng = random.Random(3)
    for _ in range(400):
        a = [rng.randrange(5) for _ in range(rng.randrange(0, 12 * PREFIX_SPAN))]
        b = a[: rng.randrange(0, len(a) + 1)] + [rng.randrange(5) for _ in range(rng.randrange(0, 3 * PREFIX_SPAN))]
        expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix_len(a, b) == expected == common_prefix_len(b, a)
        assert common_prefix_len(tuple(a), b) == expected == common_prefix_len(a, tuple(b))  # (Sequence[int]s)


def test_cache_table_evicts_least_recently_used():
    table = SessionCacheTable(max_bytes=8 * 10)
    for name in "abc":
        table.get_or_create(name).tokens = [0] * 4  # 32 bytes each
    table.get_or_create("a")  # touch: b is now the oldest
    table.enforce_bounds(keep="c")
    assert "b" not in table and "a" in table and "c" in table
    assert table.evictions == 1


def test_text_stream_holds_back_possible_stop_strings():
    tokenizer = build_tokenizer()
    ids = tokenizer.encode("hello world. bye", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["bye"])
    out = stream.feed(ids[:5], final=False)  # "hello": the last 2 chars could start "bye"
    assert out == "hel"
    cut = stream.stop_cut(ids, 0)
    assert tokenizer.decode(ids[:cut]).endswith("by" + "e")
    assert stream.feed(ids[:cut], final=True) == "lo world. "


class _CountingTokenizer:
    """A tokenizer that records how many ids each decode was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("tokenizer_name", ["tiny", "smollm2"])
def test_text_stream_sends_the_whole_text_once_decoding_only_the_recent_tokens(tokenizer_name):
    """Fed a growing answer in rounds of 1-6 tokens, the stream sends exactly the whole text
    (characters split over tokens, spaces, a stop string held back and cut where it starts),
    each piece a continuation of what was sent; and a round decodes a window of recent tokens,
    not the whole answer (the old stream decoded all of it every round: quadratic in its length)."""
    import random

    from coordinator.text_stream import CONTEXT_TOKENS

    if tokenizer_name == "smollm2":
        base = models.load_tokenizer("smollm2")
        sentence, ending = "Déjà vu: naïve café owners in Zürich — 東京 and 🙂 — sell crème brûlée. ", "Fin — 終わり 🙂. "
    else:
        base = build_tokenizer()
        sentence, ending = "hello world. the sea is calm today and the sky is blue. ", "the end, at last! "
    text = sentence * 12 + ending + sentence * 2
    ids = base.encode(text, add_special_tokens=False)
    whole = base.decode(ids, skip_special_tokens=True)
    assert len(ids) > 300 and whole.count(ending.strip()) == 1
    rng = random.Random(5)
    for stop in ([], [ending.strip(), "never in the text"]):
        counting = _CountingTokenizer(base)
        stream, sent, fed = TextStream(counting, stop), "", 0
        while True:
            fed = min(len(ids), fed + rng.randint(1, 6))
            cut = stream.stop_cut(ids[:fed], fed - 1)
            final = cut is not None or fed == len(ids)
            piece = stream.feed(ids[: cut or fed], final=final)
            sent += piece
            assert whole.startswith(sent)
            if final:
                break
        at = whole.find(ending.strip()) if stop else len(whole)
        assert sent == whole[:at] and (cut is not None) == bool(stop)
        assert max(counting.lengths[len(counting.lengths) // 2 :]) <= 10 * CONTEXT_TOKENS, \
            "a round decoded the whole answer"


def test_tensor_codec_round_trip_and_malformed_input():
    probs = torch.rand(3, 7)
    assert torch.equal(decode_tensor(encode_tensor(probs)), probs)
    message = encode_tensor(probs)
    message.data = message.data[:-4]
    with pytest.raises(InvalidArgument, match="needs 84 bytes"):
        decode_tensor(message)
    with pytest.raises(InvalidArgument, match="does not match"):
        decode_tensor(encode_tensor(probs), expected_shape=(3, 8))
    with pytest.raises(InvalidArgument, match="dtype"):
        decode_tensor(common_pb2.Tensor(data=b"", dtype=common_pb2.DTYPE_UNSPECIFIED, shape=[0]))


@dataclasses.dataclass(frozen=True)
class _Example:
    port: int = option(1, "a port")
    names: tuple[str, ...] = option(("a",), "some names")
    verbose: bool = option(False, "talk more")


def test_config_flags_override_environment_override_defaults(monkeypatch):
    assert parse_config(_Example, [], "x", "EX_") == _Example(1, ("a",), False)
    monkeypatch.setenv("EX_PORT", "7")
    monkeypatch.setenv("EX_NAMES", "b, c")
    monkeypatch.setenv("EX_VERBOSE", "yes")
    assert parse_config(_Example, [], "x", "EX_") == _Example(7, ("b", "c"), True)
    assert parse_config(_Example, ["--port", "9"], "x", "EX_").port == 9


def test_retry_backoff_doubles_with_jitter_up_to_its_cap():
    from coordinator.clients import RetryPolicy

    policy = RetryPolicy(attempts=6, initial_backoff_s=0.1, max_backoff_s=0.5)
    for retry, full in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (5, 0.5)]:
        waits = [policy.backoff_s(retry) for _ in range(200)]
        assert all(full / 2 <= w <= full for w in waits), retry
        assert max(waits) - min(waits) > full / 10, "jitter spreads the retries of many sessions"


# --- a tree grafted on prompt lookup's continuation (the hybrid feature drafter) ---------------


def test_graft_chain_puts_the_copy_first_merges_equal_nodes_and_keeps_the_budget():
    from draft_service.feature_drafter import graft_chain
    from specdec.sampling import tree_depths

    # The head's tree: 5 -> 6 -> 9, and 8 beside 5, with the head's confidences.
    tokens, parents, confidences = [5, 6, 9, 8], [-1, 0, 1, -1], [0.6, 0.5, 0.3, 0.2]
    assert graft_chain([], tokens, parents, confidences, 7) == (tokens, parents, confidences)
    # The copy 5 6 7 shares the head's 5 6: they merge, the head's 9 hangs under the copy's 6. Copied
    # nodes are sure (1.0), the head's keep their own confidence.
    assert graft_chain([5, 6, 7], tokens, parents, confidences, 7) == (
        [5, 6, 7, 9, 8], [-1, 0, 1, 1, -1], [1.0, 1.0, 1.0, 0.3, 0.2])
    # A budget of 4 keeps the copy and the head's likeliest other node only.
    assert graft_chain([5, 6, 7], tokens, parents, confidences, 4) == ([5, 6, 7, 9], [-1, 0, 1, 1], [1.0] * 3 + [0.3])
    # A copy that differs from the first token on is a branch of its own beside the head's tree.
    merged, merged_parents, merged_confidences = graft_chain([3, 6], tokens, parents, confidences, 6)
    assert merged == [3, 6, 5, 6, 9, 8] and merged_parents == [-1, 0, -1, 2, 3, -1]
    assert merged_confidences == [1.0, 1.0, 0.6, 0.5, 0.3, 0.2]
    assert max(tree_depths(merged_parents)) == 3
    # A copy longer than the budget is cut to it.
    assert graft_chain([1, 2, 3, 4], tokens, parents, confidences, 2) == ([1, 2], [-1, 0], [1.0, 1.0])
