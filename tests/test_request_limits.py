"""Unit tests of the checks that bound a request's cost before its work is done."""

from __future__ import annotations

import json
import logging
import random

import pytest
from transformers import PreTrainedTokenizerFast

from conftest import TINY
from ovis2_xinf.errors import Ovis2LimitError, Ovis2RequestError
from ovis2_xinf.model import _check_partition, _has_media, max_partition_limit, media_workers
from ovis2_xinf.preprocessing import (COVERING_THRESHOLD, DEFAULT_MAX_PARTITION_LIMIT, MAX_PARTITION_CEILING,
                                      _covering_area, choose_grid, partition)
from ovis2_xinf.prompt import TEXT_SLICE, Turn, _refuse_if_over, _slices, image_tokens
from ovis2_xinf.registration import _ClientErrorsInOneLine, _validation_message, check_chat_body
from ovis2_xinf.request_fields import MAX_BODY_DEPTH, body_depth, check_body


@pytest.fixture(scope="module")
def tokenizer():
    return PreTrainedTokenizerFast(tokenizer_file=str(TINY / "tokenizer.json"))


# --- the crop grid -----------------------------------------------------------------------------

def every_grid_rule(width: int, height: int, side: int, max_partition: int):
    """The original's rule as written there: every (rows, cols) up to max_partition each, skipping
    those over max_partition crops."""
    scored = []
    for rows in range(1, max_partition + 1):
        for cols in range(1, max_partition + 1):
            if rows * cols > max_partition:
                continue
            ratio = sum(_covering_area(b, side) for b in partition(width, height, (rows, cols))) / (width * height)
            scored.append(((rows, cols), ratio))
    good = [item for item in scored if item[1] > COVERING_THRESHOLD]
    if good:
        return min(good, key=lambda x: (x[0][0] * x[0][1], -x[1]))[0]
    return min(scored, key=lambda x: (-x[1], x[0][0] * x[0][1]))[0]


def test_choose_grid_visits_only_allowed_grids_and_picks_as_the_original():
    rng = random.Random(7)
    sizes = [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(400)]
    sizes += [(s, s) for s in (1, 448, 896, 1344, 5000)] + [(1, 900), (900, 1), (1920, 1080)]
    for width, height in sizes:
        for max_partition in (1, 4, 9, DEFAULT_MAX_PARTITION_LIMIT, 25):
            assert choose_grid(width, height, 448, max_partition) == every_grid_rule(width, height, 448, max_partition)


def test_the_grid_at_the_ceiling_has_at_most_that_many_crops():
    rows, cols = choose_grid(20000, 20000, 448, MAX_PARTITION_CEILING)
    assert rows * cols <= MAX_PARTITION_CEILING


def test_image_tokens_count_indicators_and_crops():
    assert image_tokens((1, 1), 4) == 4 + 3  # start, atom, separator, end
    assert image_tokens((2, 4), 4) == 9 * 4 + 3 + 3 * 2 + 1  # whole image + 8 crops; 6 column and 1 row separators


# --- max_partition and media workers -----------------------------------------------------------

def test_max_partition_limit_from_launch_or_environment(monkeypatch):
    monkeypatch.delenv("OVIS2_XINF_MAX_PARTITION", raising=False)
    assert max_partition_limit({}) == DEFAULT_MAX_PARTITION_LIMIT
    assert max_partition_limit({"max_partition_limit": 25}) == 25
    monkeypatch.setenv("OVIS2_XINF_MAX_PARTITION", "36")
    assert max_partition_limit({}) == 36
    for bad in ("0", "65", "2.5", "many"):
        monkeypatch.setenv("OVIS2_XINF_MAX_PARTITION", bad)
        with pytest.raises(ValueError, match="OVIS2_XINF_MAX_PARTITION"):
            max_partition_limit({})


def test_a_request_over_the_partition_limit_names_the_field_and_setting():
    _check_partition(16, 16, "mm_processor_kwargs.max_partition", Ovis2LimitError)
    with pytest.raises(Ovis2LimitError, match=r"max_partition: 10000 is over the limit of 16 .*OVIS2_XINF_MAX_PARTITION"):
        _check_partition(10000, 16, "mm_processor_kwargs.max_partition", Ovis2LimitError)
    for bad in (0, -1, True, 2.0, "9"):
        with pytest.raises(Ovis2RequestError, match="must be a positive integer"):
            _check_partition(bad, 16, "mm_processor_kwargs.max_partition", Ovis2LimitError)


def test_media_workers_option(monkeypatch):
    monkeypatch.delenv("OVIS2_XINF_MEDIA_WORKERS", raising=False)
    assert media_workers({}) == 2
    assert media_workers({"media_workers": 4}) == 4
    with pytest.raises(ValueError, match="media_workers"):
        media_workers({"media_workers": 0})


def test_only_requests_with_media_go_to_the_media_threads():
    assert not _has_media([{"role": "user", "content": "hi"}])
    assert not _has_media([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert _has_media([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert _has_media([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}])
    assert not _has_media("not a list") and not _has_media([None, 3])
    assert not _has_media([{"role": "user", "content": [{"type": ["image_url"]}, {"type": {"a": 1}}]}])


# --- long text ---------------------------------------------------------------------------------

def test_slices_cover_the_text_and_cut_before_single_spaces():
    rng = random.Random(3)
    words = ["alpha", "beta", "  ", "\n", "日本語", "x" * 40]
    text = " ".join(rng.choice(words) for _ in range(30000))
    slices = _slices(text)
    assert "".join(slices) == text and len(slices) > 2
    for piece in slices[1:]:
        assert piece[0] == " " and not piece[1].isspace()
    assert _slices("short") == ["short"]
    assert "".join(_slices("y" * (3 * TEXT_SLICE + 5))) == "y" * (3 * TEXT_SLICE + 5)


def test_sliced_count_equals_the_whole_count_on_word_text(tokenizer):
    text = " ".join(random.Random(5).choice(["hello", "world", "the", "fox"]) for _ in range(40000))
    whole = len(tokenizer(text, add_special_tokens=False).input_ids)
    assert sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in _slices(text)) == whole


def test_huge_text_is_refused_after_reading_about_a_context_of_it(tokenizer, monkeypatch):
    calls = []
    counting = lambda text, **kw: calls.append(len(text)) or tokenizer(text, **kw)  # noqa: E731
    with pytest.raises(Ovis2LimitError, match="the text holds over 4000 tokens"):
        _refuse_if_over(counting, "word " * 2_000_000, 4000)
    assert sum(calls) <= 2 * TEXT_SLICE  # 4000 tokens of "word " are under one slice
    _refuse_if_over(tokenizer, "word " * 10000, 10**6)  # fits: no error


def test_encode_refuses_text_over_the_context_and_keeps_ids_otherwise(tiny_model):
    from ovis2_xinf.checkpoint import tokens_per_crop
    from ovis2_xinf.prompt import encode

    per_crop = tokens_per_crop(tiny_model.model.config)
    turns = [Turn("human", "word " * 20000)]
    plain = encode(tiny_model.tokenizer, turns, [], tiny_model.placeholders, per_crop)
    bounded = encode(tiny_model.tokenizer, turns, [], tiny_model.placeholders, per_crop, max_tokens=10**6)
    assert plain.input_ids.tolist() == bounded.input_ids.tolist()
    with pytest.raises(Ovis2LimitError):
        encode(tiny_model.tokenizer, turns, [], tiny_model.placeholders, per_crop, max_tokens=4096)


# --- body checks -------------------------------------------------------------------------------

def test_body_depth_counts_without_recursion():
    assert body_depth(1) == 0 and body_depth({}) == 1 and body_depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(50000):
        deep = [deep]
    assert body_depth(deep) == MAX_BODY_DEPTH + 1  # stops counting past the limit


def test_check_body_refuses_depth_choices_and_bad_messages():
    check_body({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(Ovis2RequestError, match="body: nested more than 160"):
        check_body({"messages": [{"role": "user", "content": "hi"}], "x": json.loads("[" * 170 + "]" * 170)})
    with pytest.raises(Ovis2RequestError, match="n: 3 choices"):
        check_body({"messages": [{"role": "user", "content": "hi"}], "n": 3})
    with pytest.raises(Ovis2RequestError, match=r"messages\[0\].role: 'tool'"):
        check_body({"messages": [{"role": "tool", "content": "x"}]})


@pytest.mark.parametrize("field, value, needle", [
    ("max_tokens", 0, "max_tokens: "), ("temperature", float("nan"), "temperature: "),
    ("temperature", float("inf"), "temperature: "), ("top_p", 1.5, "top_p: "), ("top_k", -5, "top_k: "),
    ("stream", "yes please", "stream: "), ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}},
                          "response_format.json_schema.schema: "),
])
def test_xinference_validation_errors_become_request_errors_naming_the_field(field, value, needle):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    with pytest.raises(Ovis2RequestError) as info:
        check_chat_body(body)
    assert str(info.value).startswith(needle)


def test_validation_message_names_at_most_three_fields():
    class Fake:
        def errors(self):
            return [{"loc": ("a", 0, "b"), "msg": "bad"}] * 5

    assert _validation_message(Fake()) == "a.0.b: bad; a.0.b: bad; a.0.b: bad"


# --- logging -----------------------------------------------------------------------------------

def record_with(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        import sys

        return logging.LogRecord("xinference.api.restful_api", logging.ERROR, __file__, 1, "failed: %s",
                                 (error,), sys.exc_info())


def test_a_client_error_becomes_one_warning_line_and_other_errors_keep_their_traceback():
    api, model = _ClientErrorsInOneLine(keep=True), _ClientErrorsInOneLine(keep=False)
    record = record_with(Ovis2RequestError("[address=1.2.3.4:5, pid=6] top_p: bad"))
    assert api.filter(record)
    assert record.levelname == "WARNING" and record.exc_info is None
    assert record.getMessage() == "ovis2-xinf: refused a chat request (HTTP 400): top_p: bad"
    assert not model.filter(record_with(Ovis2RequestError("x")))
    other = record_with(RuntimeError("boom"))
    assert api.filter(other) and model.filter(other) and other.levelno == logging.ERROR and other.exc_info
