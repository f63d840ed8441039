"""Sampling settings and the text stream built from generated tokens."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY
from ovis2_xinf.errors import Ovis2LimitError, Ovis2RequestError
from ovis2_xinf.generation import IncrementalText, plan_sampling, stream_text
from ovis2_xinf.loader import load_tokenizer

CHECKPOINT_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
EOS = [527, 525]


def text_events(batches, tokenizer, plan_) -> list:
    """``stream_text``'s events for these batches of token ids, as the model's event loop gets them."""
    async def feed():
        for batch in batches:
            yield batch

    async def collect():
        return [event async for event in stream_text(feed(), tokenizer, plan_, EOS)]

    return asyncio.run(collect())


def plan(config, prompt_tokens=10, context=100):
    return plan_sampling(config, CHECKPOINT_DEFAULTS, EOS, 525, prompt_tokens, context)


def test_checkpoint_defaults_apply_when_the_request_is_silent():
    kwargs = plan({}).generate_kwargs
    assert kwargs["do_sample"] and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.8 and kwargs["top_k"] == 20
    assert kwargs["repetition_penalty"] == 1.05 and kwargs["eos_token_id"] == EOS and kwargs["max_new_tokens"] == 90


def test_request_settings_win_and_temperature_zero_is_greedy():
    kwargs = plan({"temperature": 0.3, "top_p": 0.5, "top_k": 5, "repetition_penalty": 1.0, "max_tokens": 7}).generate_kwargs
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"], kwargs["max_new_tokens"]) == (0.3, 0.5, 5, 7)
    greedy = plan({"temperature": 0}).generate_kwargs
    assert greedy["do_sample"] is False and "temperature" not in greedy


def test_stop_token_ids_join_eos_and_seed_is_kept():
    result = plan({"stop_token_ids": [13], "seed": 42, "stop": "END"})
    assert result.generate_kwargs["eos_token_id"] == [527, 525, 13]
    assert result.seed == 42 and result.stop == ["END"]


def test_context_length_is_enforced_not_truncated():
    with pytest.raises(Ovis2LimitError, match="120 tokens .* reach the context length of 100"):
        plan({}, prompt_tokens=120)
    assert plan({"max_tokens": 500}, prompt_tokens=95).max_new_tokens == 5


@pytest.mark.parametrize(
    "config,needle",
    [({"temperature": "hot"}, "temperature: must be a number"), ({"top_p": 2}, "top_p: 2 is outside"),
     ({"stop": [1]}, "stop: must be a string or a list of strings"),
     ({"stop_token_ids": ["a"]}, "stop_token_ids: must be a list of integers"),
     ({"max_tokens": 0}, "max_tokens: 0 is outside")],
)
def test_bad_settings_are_named(config, needle):
    with pytest.raises(Ovis2RequestError, match=needle):
        plan(config)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def _run(tokenizer, text_or_ids, config, eos_at_end=False):
    """The same ids one token per batch and all in one batch must give the same answer."""
    ids = tokenizer(text_or_ids, add_special_tokens=False).input_ids if isinstance(text_or_ids, str) else text_or_ids
    if eos_at_end:
        ids = ids + [527]
    answers = []
    for batches in ([[i] for i in ids], [ids]):
        events = text_events(batches, tokenizer, plan(config))
        answers.append(("".join(e.text for e in events), events[-1].finish_reason, events[-1].completion_tokens))
    assert answers[0] == answers[1]
    return answers[0]


def test_stream_text_finishes_on_eos_and_counts_it(tokenizer):
    text, reason, count = _run(tokenizer, "hello world", {}, eos_at_end=True)
    assert text == "hello world" and reason == "stop"
    assert count == len(tokenizer("hello world", add_special_tokens=False).input_ids) + 1


def test_stream_text_length_when_no_eos(tokenizer):
    assert _run(tokenizer, "hello world", {})[1] == "length"


def test_stop_string_is_cut_and_never_sent(tokenizer):
    ids = tokenizer("one two STOP three", add_special_tokens=False).input_ids
    for batches in ([[i] for i in ids], [ids[:3], ids[3:]], [ids]):
        events = text_events(batches, tokenizer, plan({"stop": ["STOP"]}))
        assert "".join(e.text for e in events) == "one two "
        assert all("S" not in e.text for e in events)
        assert events[-1].finish_reason == "stop"


def test_one_event_per_batch(tokenizer):
    ids = tokenizer("one two three four", add_special_tokens=False).input_ids
    events = text_events([ids[:2], ids[2:]], tokenizer, plan({}))
    assert [e.text for e in events if e.text] == [tokenizer.decode(ids[:2]), tokenizer.decode(ids)[len(tokenizer.decode(ids[:2])):]]


def test_held_back_prefix_is_flushed_when_it_is_not_a_stop(tokenizer):
    text, reason, _ = _run(tokenizer, "one ST", {"stop": ["STOP"]}, eos_at_end=True)
    assert text == "one ST" and reason == "stop"


def _one_decode(tokenizer, ids, stops):
    """What a stream must add up to: one decode of the tokens before eos, cut at the first stop string."""
    end = next((i for i, token in enumerate(ids) if token in EOS), len(ids))
    text = tokenizer.decode(ids[:end], skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "stop"
    return text, "stop" if end < len(ids) else "length"


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 546), max_size=40), sizes=st.lists(st.integers(1, 6), min_size=1, max_size=40),
       stops=st.lists(st.sampled_from(["STOP", "e", " th", "\u4f60", "\n\n"]), max_size=2))
def test_streamed_text_is_one_decode_of_the_answer(tokenizer, ids, sizes, stops):
    # Random ids from the byte-level vocabulary split UTF-8 sequences anywhere; the incremental
    # decode must still add up to one decode of the whole answer, for any split into batches.
    batches, position = [], 0
    while position < len(ids):
        size = sizes[len(batches) % len(sizes)]
        batches.append(ids[position: position + size])
        position += size
    events = text_events(batches, tokenizer, plan({"stop": stops}))
    assert ("".join(e.text for e in events), events[-1].finish_reason) == _one_decode(tokenizer, ids, stops)


def test_a_stop_string_before_an_unfinished_character_is_cut(tokenizer):
    # The answer ends (length) with the stop string followed by half a UTF-8 character.
    ids = tokenizer("one STOP", add_special_tokens=False).input_ids + tokenizer("\u4f60", add_special_tokens=False).input_ids[:1]
    assert tokenizer.decode(ids).endswith("STOP\ufffd")
    for batches in ([[i] for i in ids], [ids]):
        events = text_events(batches, tokenizer, plan({"stop": ["STOP"]}))
        assert "".join(e.text for e in events) == "one " and events[-1].finish_reason == "stop"


def test_incremental_text_decodes_a_window_not_the_answer(tokenizer):
    # Each call decodes only the ids since the text was last complete, whatever the answer's length.
    lengths = []

    class Counting:
        def decode(self, ids, skip_special_tokens):
            lengths.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    answer = IncrementalText(Counting())
    pieces = []
    for token in tokenizer("hello world " * 50, add_special_tokens=False).input_ids:
        answer.ids.append(token)
        pieces.append(answer.take())
    assert "".join(pieces) == "hello world " * 50
    assert max(lengths) <= 2


def test_ignore_eos_generates_exactly_max_tokens():
    assert plan({"ignore_eos": True, "max_tokens": 9}).generate_kwargs["min_new_tokens"] == 9
    assert "min_new_tokens" not in plan({"max_tokens": 9}).generate_kwargs
