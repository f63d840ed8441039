"""Structured output, logprobs and request fields: unit checks and a real server with the openai client.

The tiny checkpoint has random weights, so whatever parses and validates below does so because
the grammar did all the work.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import BadRequestError, OpenAI

from conftest import TINY
from ovis2_xinf.batching import BatchScheduler, RowOptions, kv_bytes_per_token
from ovis2_xinf.errors import Ovis2LimitError, Ovis2RequestError
from ovis2_xinf.generation import plan_sampling
from ovis2_xinf.loader import load_tokenizer
from ovis2_xinf.local_server import local_server
from ovis2_xinf.request_fields import refuse_unsupported, top_logprobs
from ovis2_xinf.structured import (ENV_MAX_CHOICES, ENV_MAX_GRAMMAR_BYTES, ENV_MAX_SCHEMA_BYTES,
                                   ENV_MAX_SCHEMA_DEPTH, GrammarLimits, Grammars, requested)

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


def _nested(depth: int) -> dict:
    """``{"a": {"a": ...}}`` ``depth`` objects deep, built without recursion."""
    root = inner = {}
    for _ in range(depth - 1):
        inner["a"] = {}
        inner = inner["a"]
    return root


def _schema_request(schema) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


# --- hostile constraints: refused as a 400 naming the field, before any cost is paid --------

LIMITS = GrammarLimits()


@pytest.fixture(scope="module")
def grammars():
    """A compiler on the bundled tokenizer alone (no model weights)."""
    return Grammars(load_tokenizer(TINY), 576, 527)


@pytest.mark.parametrize("config,needle", [
    ({"guided_json": "{not json"}, "guided_json: not valid JSON"),
    ({"guided_json": '{"maximum": NaN}'}, "guided_json: not valid JSON (NaN is not a JSON number)"),
    ({"guided_json": '{"maximum": 1e400}'}, "guided_json: not JSON"),
    ({"guided_json": "[1, 2]"}, "guided_json: must be a JSON schema object"),
    ({"guided_choice": []}, "guided_choice: must be a non-empty list of strings"),
    ({"guided_choice": ["a", 1]}, "guided_choice: must be a non-empty list of strings, item 1 is int"),
    ({"guided_choice": ["\ud800"]}, "guided_choice[0]: not valid Unicode text"),
    ({"guided_regex": ""}, "guided_regex: must be a non-empty string"),
    ({"guided_grammar": ""}, "guided_grammar: must be a non-empty string"),
    ({"guided_regex": ["a"]}, "guided_regex: must be a non-empty string"),
    ({"guided_json_object": "yes"}, "guided_json_object: must be true or false"),
    ({"guided_json_object": _nested(100_000)}, "guided_json_object: must be true or false, got <dict>"),
    ({"response_format": {"type": _nested(100_000)}}, "response_format.type: <dict> is not one of"),
    ({"response_format": {"type": 10**5000}}, "response_format.type: <int> is not one of"),
    ({"guided_choice": [], "guided_regex": "a"}, "guided_choice and guided_regex: give one"),
])
def test_hostile_shapes_are_refused_naming_the_field(config, needle):
    with pytest.raises(Ovis2RequestError) as info:
        requested(config)
    assert needle in str(info.value)


def test_an_unset_flag_asks_for_nothing():
    assert requested({"guided_json_object": False, "guided_regex": None}) == (None, None)


@pytest.mark.parametrize("config,field,limit,env", [
    ({"guided_json": "[" * 10_000}, "guided_json", LIMITS.schema_depth, ENV_MAX_SCHEMA_DEPTH),
    ({"guided_json": '{"a":' * 65 + "{}" + "}" * 65}, "guided_json", LIMITS.schema_depth, ENV_MAX_SCHEMA_DEPTH),
    ({"guided_json": _nested(100_000)}, "guided_json", LIMITS.schema_depth, ENV_MAX_SCHEMA_DEPTH),
    (_schema_request(_nested(100_000)), "response_format.json_schema.schema", LIMITS.schema_depth,
     ENV_MAX_SCHEMA_DEPTH),
    ({"guided_json": json.dumps({"enum": ["x" * 100] * 700})}, "guided_json", LIMITS.schema_bytes,
     ENV_MAX_SCHEMA_BYTES),
    (_schema_request({"enum": list(range(10**6))}), "response_format.json_schema.schema", LIMITS.schema_bytes,
     ENV_MAX_SCHEMA_BYTES),
    (_schema_request({"type": "string", "pattern": "a" * (LIMITS.grammar_bytes + 1)}),
     "response_format.json_schema.schema", LIMITS.grammar_bytes, ENV_MAX_GRAMMAR_BYTES),
    ({"guided_choice": [str(i) for i in range(LIMITS.choices + 1)]}, "guided_choice", LIMITS.choices,
     ENV_MAX_CHOICES),
    ({"guided_choice": ["x" * 1000] * 17}, "guided_choice", LIMITS.grammar_bytes, ENV_MAX_GRAMMAR_BYTES),
    ({"guided_regex": "a" * (LIMITS.grammar_bytes + 1)}, "guided_regex", LIMITS.grammar_bytes,
     ENV_MAX_GRAMMAR_BYTES),
    ({"guided_grammar": "start: " + '"a" ' * 5000}, "guided_grammar", LIMITS.grammar_bytes, ENV_MAX_GRAMMAR_BYTES),
], ids=["text-depth", "text-depth-just-over", "object-depth", "response-format-depth", "text-bytes",
        "object-bytes", "pattern-bytes", "choices", "choice-bytes", "regex-bytes", "grammar-bytes"])
def test_limits_are_checked_before_parsing_or_compiling(config, field, limit, env):
    with pytest.raises(Ovis2LimitError) as info:
        requested(config)
    message = str(info.value)
    assert message.startswith(f"{field}: ") and f"limit of {limit} " in message and f"(setting: {env})" in message


@pytest.mark.parametrize("config,field", [
    ({"guided_regex": "(" * 10_000}, "guided_regex"),
    ({"guided_regex": "a{2,1}"}, "guided_regex"),
    ({"guided_grammar": "start: " + "(" * 5000 + '"a"' + ")" * 5000}, "guided_grammar"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "guided_json"),
    ({"guided_json": {"$ref": "#/nowhere"}}, "guided_json"),
])
def test_llguidance_errors_are_a_short_400_naming_the_field(grammars, config, field):
    with pytest.raises(Ovis2RequestError) as info:
        grammars.compile(config)
    message = str(info.value)
    assert message.startswith(f"{field}: ") and len(message) <= len(field) + 2 + 300
    assert "<non-verbose/>" not in message


def test_constraints_just_within_the_limits_compile(grammars):
    schema = _nested(LIMITS.schema_depth)
    schema["description"] = ""
    schema["description"] = "x" * (LIMITS.schema_bytes - len(json.dumps(schema, separators=(",", ":"))))
    assert len(json.dumps(schema, separators=(",", ":"))) == LIMITS.schema_bytes
    pattern = "[a-z]" * (LIMITS.grammar_bytes // 5)
    width = LIMITS.grammar_bytes // LIMITS.choices
    for config in (_schema_request(schema), {"guided_json": json.dumps(schema, separators=(",", ":"))},
                   {"guided_json": {"type": "string", "pattern": pattern}}, {"guided_regex": pattern},
                   {"guided_choice": [f"{i:0{width}d}" for i in range(LIMITS.choices)]}):
        assert grammars.compile(config) is not None


def test_recursion_that_would_overflow_a_thread_stack_is_survived(grammars):
    """Both build a recursion in llguidance's compile of some 13-19 MiB of stack, more than the 8 MiB
    of a main thread: without the compile thread's own stack this test kills pytest."""
    rules = "".join(f"r{i}:{'(' * 24}r{i + 1}{')' * 24}\n" for i in range(270))
    grammar = f"start: r0\n{rules}r270: \"y\"\n"
    assert len(grammar) < LIMITS.grammar_bytes
    assert grammars.compile({"guided_grammar": grammar}) is not None
    chain = {f"d{i}": {"prefixItems": [{"prefixItems": [{"prefixItems": [{"$ref": f"#/d{i + 1}"}]}]}]}
             for i in range(800)}
    chain.update({"d800": {"type": "integer"}, "$ref": "#/d0"})
    assert len(json.dumps(chain, separators=(",", ":"))) < LIMITS.schema_bytes
    try:
        grammars.compile(_schema_request(chain))
    except Ovis2RequestError as exc:
        assert str(exc).startswith("response_format.json_schema.schema: ")


def test_a_schema_of_exactly_the_limit_is_never_refused_as_larger():
    """The walk over a parsed schema refuses on a lower bound of its size: never above the real one."""
    schema = {"a": [1, "é", None, {"b": [True, 2.5, {}], "": []}], "c": {"d": "x" * 50}, "e": []}
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
    kind, text = requested({"guided_json": schema}, GrammarLimits(schema_bytes=size))
    assert kind == "json_schema" and len(text.encode()) == size
    with pytest.raises(Ovis2LimitError):
        requested({"guided_json": schema}, GrammarLimits(schema_bytes=size - 1))


def test_limits_come_from_the_environment():
    assert GrammarLimits.from_env({}) == GrammarLimits()
    env = {ENV_MAX_SCHEMA_BYTES: "1024", ENV_MAX_SCHEMA_DEPTH: " 8 ", ENV_MAX_GRAMMAR_BYTES: "100",
           ENV_MAX_CHOICES: "3"}
    limits = GrammarLimits.from_env(env)
    assert limits == GrammarLimits(schema_bytes=1024, schema_depth=8, grammar_bytes=100, choices=3)
    with pytest.raises(Ovis2LimitError, match=ENV_MAX_CHOICES):
        requested({"guided_choice": ["a", "b", "c", "d"]}, limits)
    assert requested({"guided_choice": ["a", "b", "c", "d"]}) == ("guided_choice", ["a", "b", "c", "d"])


@pytest.mark.parametrize("name,raw", [
    (ENV_MAX_SCHEMA_BYTES, "64k"), (ENV_MAX_SCHEMA_BYTES, "0"), (ENV_MAX_SCHEMA_BYTES, str(1 << 30)),
    (ENV_MAX_SCHEMA_DEPTH, "-1"), (ENV_MAX_SCHEMA_DEPTH, "1000"), (ENV_MAX_GRAMMAR_BYTES, "1.5"),
    (ENV_MAX_CHOICES, "many"),
])
def test_a_bad_limit_setting_fails_at_load(name, raw):
    with pytest.raises(ValueError, match=name):
        GrammarLimits.from_env({name: raw})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
SCHEMA_WORDS = st.sampled_from(["type", "object", "string", "integer", "array", "properties", "items", "enum",
                                "pattern", "anyOf", "allOf", "$ref", "#", "#/$defs/a", "$defs", "required",
                                "minItems", "maxLength", "const", "additionalProperties", "x-guidance"])
SCHEMAS = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | SCHEMA_WORDS | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SCHEMA_WORDS, inner, max_size=4),
    max_leaves=16,
)
FIELDS = ("guided_json", "guided_choice", "guided_regex", "guided_grammar", "response_format")
HOSTILE_REQUESTS = st.one_of(
    st.builds(lambda v: {"guided_json": v}, JSON_VALUES | SCHEMAS),
    st.builds(lambda v: {"guided_json": json.dumps(v)}, SCHEMAS),
    st.builds(lambda v: {"guided_json": v}, st.text(alphabet="{}[]\":,ab1 \\", max_size=40)),
    st.builds(lambda v: {"guided_choice": v}, JSON_VALUES | st.lists(st.text(max_size=6), max_size=5)),
    st.builds(lambda v: {"guided_regex": v},
              st.text(max_size=30) | st.text(alphabet="()[]{}|*+?ab\\,0-9^$.", max_size=30)),
    st.builds(lambda v: {"guided_grammar": v}, st.text(max_size=30) | st.just("start: /a+/ | b\nb: \"x\"")),
    st.builds(lambda v: {"response_format": v}, JSON_VALUES),
    st.builds(lambda v: {"response_format": {"type": "json_schema", "json_schema": {"schema": v}}}, SCHEMAS),
)


@settings(max_examples=150, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(config=HOSTILE_REQUESTS)
def test_any_request_compiles_or_is_a_400(grammars, config):
    """Whatever a client sends in these fields, the answer is a grammar or a 400 naming the field:
    never another exception (a 500), a recursion error or a crash."""
    try:
        grammars.compile(config)
    except Ovis2RequestError as exc:
        assert str(exc).startswith(FIELDS)


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
@pytest.mark.parametrize("extra_body,detail", [
    ({"guided_json": "{not json"}, "guided_json: not valid JSON"),
    ({"guided_json": "[" * 10_000}, "guided_json: the schema nests 10000 levels"),
    ({"guided_choice": []}, "guided_choice: must be a non-empty list of strings"),
    ({"guided_regex": "a" * 20_000}, "guided_regex: 20000 bytes, over the limit of 16384"),
])
def test_hostile_constraints_over_http_are_a_400(served, extra_body, detail):
    client, uid = served
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=uid, messages=MESSAGES, max_tokens=5, extra_body=extra_body)
    assert info.value.response.json()["detail"].startswith(detail)


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
