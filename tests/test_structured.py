"""Structured output, logprobs and request fields: unit checks and a real server with the openai client.

The tiny checkpoint has random weights, so whatever parses and validates below does so because
the grammar did all the work.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from openai import BadRequestError, OpenAI

from conftest import TINY
from ovis2_xinf.batching import BatchScheduler, RowOptions, kv_bytes_per_token
from ovis2_xinf.errors import Ovis2RequestError
from ovis2_xinf.generation import plan_sampling
from ovis2_xinf.loader import load_tokenizer
from ovis2_xinf.local_server import local_server
from ovis2_xinf.request_fields import refuse_unsupported, top_logprobs
from ovis2_xinf.structured import Grammars, requested

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 8},
        "shape": {"enum": ["circle", "square", "triangle"]},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
        "colours": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"enum": ["red", "green", "blue"]}},
        "box": {"type": "object", "properties": {"visible": {"type": "boolean"}, "kind": {"enum": ["a", "b"]}},
                "required": ["visible", "kind"], "additionalProperties": False},
    },
    "required": ["title", "shape", "size", "colours", "box"],
    "additionalProperties": False,
}
IDS = torch.tensor([[526, 384, 198, 462, 527, 198, 526, 439, 198]])


def validate(value: dict) -> None:
    """The schema's rules, checked by hand (no validator dependency for one schema)."""
    assert set(value) == set(SCHEMA["required"])
    assert isinstance(value["title"], str) and len(value["title"]) <= 8
    assert value["shape"] in ("circle", "square", "triangle")
    assert isinstance(value["size"], int) and 0 <= value["size"] <= 99
    assert 1 <= len(value["colours"]) <= 3 and set(value["colours"]) <= {"red", "green", "blue"}
    assert set(value["box"]) == {"visible", "kind"} and isinstance(value["box"]["visible"], bool)
    assert value["box"]["kind"] in ("a", "b")


# --- units ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config,needle", [
    ({"response_format": {"type": "xml"}}, "response_format.type: 'xml' is not one of"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema: must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}}, "json_schema.schema: must be"),
    ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, "give one of them"),
    ({"guided_choice": "yes"}, "guided_choice: must be a non-empty list"),
])
def test_malformed_constraints_are_named(config, needle):
    with pytest.raises(Ovis2RequestError, match=None) as info:
        requested(config)
    assert needle in str(info.value)


def test_text_format_asks_for_nothing():
    assert requested({"response_format": {"type": "text"}}) == (None, None)
    assert requested({}) == (None, None)


def test_invalid_schema_is_a_400_naming_the_field(tiny_model):
    grammars = Grammars(tiny_model.tokenizer, 576, 527)
    bad = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}}
    with pytest.raises(Ovis2RequestError) as info:
        grammars.compile(bad)
    assert str(info.value) == "response_format.json_schema.schema: Invalid type: strin"


@pytest.mark.parametrize("config,needle", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools:"),
    ({"tool_choice": "required"}, "tool_choice:"),
    ({"echo": True}, "echo:"),
    ({"lora_name": "x"}, "lora_name:"),
    ({"top_logprobs": 3}, "top_logprobs: needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs: must be an integer from 0 to 20"),
    ({"logprobs": "yes"}, "logprobs: must be true or false"),
])
def test_fields_that_would_change_the_answer_are_refused(config, needle):
    with pytest.raises(Ovis2RequestError) as info:
        refuse_unsupported(config)
    assert needle in str(info.value)


def test_fields_without_effect_pass():
    refuse_unsupported({"user": "u", "service_tier": "auto", "tool_choice": "none", "parallel_tool_calls": True})
    assert top_logprobs({"logprobs": True}) == 0 and top_logprobs({}) is None


def _run(tiny_model, options, seed=None, max_tokens=300, **sampling):
    sched = BatchScheduler(tiny_model.model, 8, 1 << 30, kv_bytes_per_token(tiny_model.model.config, tiny_model.dtype))
    try:
        plan = plan_sampling({"max_tokens": max_tokens, "seed": seed, **sampling}, {}, [527, 525], 525, IDS.shape[1], 4096)
        return [t for batch in sched.submit({"input_ids": IDS}, plan, (), options) for t in batch]
    finally:
        sched.close()


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_every_row_follows_its_own_grammar_in_one_batch(tiny_model, temperature):
    grammars = Grammars(tiny_model.tokenizer, 576, 527)
    compiled = grammars.compile({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}})
    choice = grammars.compile({"guided_choice": ["yes", "no"]})
    sched = BatchScheduler(tiny_model.model, 8, 1 << 30, kv_bytes_per_token(tiny_model.model.config, tiny_model.dtype))
    try:
        plan = plan_sampling({"max_tokens": 300, "temperature": temperature, "seed": 3}, {}, [527, 525], 525,
                             IDS.shape[1], 4096)
        streams = [sched.submit({"input_ids": IDS}, plan, (), RowOptions(grammar=grammars.matcher(compiled)))
                   for _ in range(3)]
        streams.append(sched.submit({"input_ids": IDS}, plan, (), RowOptions(grammar=grammars.matcher(choice))))
        free = sched.submit({"input_ids": IDS}, plan_sampling({"max_tokens": 20, "temperature": 0}, {}, [527], 525,
                                                              IDS.shape[1], 4096))
        answers = [tiny_model.tokenizer.decode([t for b in s for t in b], skip_special_tokens=True) for s in streams]
        for text in answers[:3]:
            validate(json.loads(text))
        assert answers[3] in ("yes", "no")
        assert [t for b in free for t in b]  # an unconstrained row in the same batch
        assert sched.stats.max_batch >= 4
    finally:
        sched.close()


def test_logprobs_follow_the_sampled_tokens(tiny_model):
    options = RowOptions(top_logprobs=3)
    tokens = _run(tiny_model, options, max_tokens=12, temperature=0)
    assert [r.token for r in options.logprobs] == tokens
    for record in options.logprobs:
        assert record.top[0][0] == record.token  # greedy: the sampled token is the most likely one
        assert math.isclose(record.top[0][1], record.logprob, abs_tol=1e-6) and record.logprob <= 0
        assert [lp for _, lp in record.top] == sorted((lp for _, lp in record.top), reverse=True)


def test_frequency_penalty_changes_a_repetitive_greedy_answer(tiny_model):
    plain = _run(tiny_model, RowOptions(), max_tokens=24, temperature=0)
    penalised = _run(tiny_model, RowOptions(), max_tokens=24, temperature=0, frequency_penalty=2.0)
    assert len(set(plain)) < len(plain)  # the random model repeats itself
    assert penalised != plain and len(set(penalised)) >= len(set(plain))


# --- through a real server -----------------------------------------------------------------

@pytest.fixture(scope="module")
def served():
    with local_server() as server:
        uid = server.launch("--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "2",
                            "--model-format", "pytorch", "--model-path", str(TINY))
        yield OpenAI(base_url=f"{server.endpoint}/v1", api_key="not-needed", max_retries=0, timeout=300), uid


MESSAGES = [{"role": "user", "content": "Describe a shape as JSON."}]


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answer_parses_and_validates(served, stream):
    client, uid = served
    kwargs = dict(model=uid, messages=MESSAGES, max_tokens=300, temperature=0.8, seed=5,
                  response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}})
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    else:
        reply = client.chat.completions.create(**kwargs)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
    validate(json.loads(text))


@pytest.mark.integration
def test_json_object_and_guided_choice(served):
    client, uid = served
    reply = client.chat.completions.create(model=uid, messages=MESSAGES, max_tokens=400, temperature=0,
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), (dict, list, str, int, float, bool, type(None)))
    choice = client.chat.completions.create(model=uid, messages=MESSAGES, max_tokens=10, temperature=0,
                                            extra_body={"guided_choice": ["cat", "dog"]})
    assert choice.choices[0].message.content in ("cat", "dog")


@pytest.mark.integration
def test_invalid_schema_and_refused_fields_over_http(served):
    client, uid = served
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=uid, messages=MESSAGES, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "strin"}}}}})
    assert info.value.response.json()["detail"] == "response_format.json_schema.schema: Invalid type: strin"
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=uid, messages=MESSAGES, max_tokens=5, tool_choice="required")
    assert info.value.response.json()["detail"].startswith("tool_choice: 'required' needs tool calls")
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=uid, messages=MESSAGES, max_tokens=5, n=2)
    assert info.value.response.json()["detail"].startswith("n: 2 choices were asked for")
    assert client.chat.completions.create(model=uid, messages=MESSAGES, max_tokens=2, n=1).choices


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_over_http_match_the_answer(served, stream):
    client, uid = served
    kwargs = dict(model=uid, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2,
                  extra_body={"repetition_penalty": 1.0, "ignore_eos": True})
    if stream:
        entries, text = [], ""
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                if chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                    entries += chunk.choices[0].logprobs.content
    else:
        reply = client.chat.completions.create(**kwargs)
        text, entries = reply.choices[0].message.content, reply.choices[0].logprobs.content
    assert len(entries) == 10
    special = {t.content for t in load_tokenizer(TINY).added_tokens_decoder.values()}  # not in the text
    shown = b"".join(bytes(e.bytes) for e in entries if e.token not in special)
    assert shown.decode("utf-8", errors="replace") == text
    for entry in entries:
        assert entry.top_logprobs[0].token == entry.token and len(entry.top_logprobs) == 2
