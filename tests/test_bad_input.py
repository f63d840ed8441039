"""Hostile requests against a real xinference-local: a 400 naming the field, never a 500, a
200 carrying an error, or a hang; the cost of a refused request is bounded; the log gets one line."""

from __future__ import annotations

import base64
import json
import re
import time

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CASES_DIR, TINY
from ovis2_xinf.local_server import local_server

pytestmark = pytest.mark.integration
IMAGE = "data:image/png;base64," + base64.b64encode((CASES_DIR / "images" / "square.png").read_bytes()).decode()
KNOWN = {"messages": [{"role": "user", "content": "hello, who are you?"}], "max_tokens": 8, "temperature": 0,
         "repetition_penalty": 1.0}


def user(content) -> list:
    return [{"role": "user", "content": content}]


def image_then(text: str) -> list:
    return user([{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": text}])


# name: (body without "model", or raw JSON text with "MODEL" for the uid; a needle the 400's detail holds)
CASES = {
    "max_tokens -1": ({"messages": user("hi"), "max_tokens": -1}, "max_tokens: "),
    "max_tokens 0": ({"messages": user("hi"), "max_tokens": 0}, "max_tokens: "),
    "temperature -1": ({"messages": user("hi"), "temperature": -1}, "temperature: "),
    "temperature NaN": ('{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                        "temperature: "),
    "temperature Infinity": ('{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], '
                             '"temperature": Infinity}', "temperature: "),
    "temperature abc": ({"messages": user("hi"), "temperature": "abc"}, "temperature: "),
    "top_p 1.5": ({"messages": user("hi"), "top_p": 1.5}, "top_p: "),
    "top_k -5": ({"messages": user("hi"), "top_k": -5}, "top_k: "),
    "json_schema without schema": ({"messages": user("hi"), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema: "),
    "json_schema a string": ({"messages": user("hi"), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": "abc"}}}, "response_format.json_schema.schema: "),
    "body nested 400 levels": ({"messages": user("hi"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": json.loads('{"a":' * 400 + "1" + "}" * 400)}}}, "body: nested more than"),
    "body nested past the parser": ('{"model": "MODEL", "messages": ' + "[" * 5000 + "]" * 5000 + "}",
                                    "body: JSON nested too deeply"),
    "not JSON": ("{not json", "body: not valid JSON"),
    "lone surrogate": ('{"model": "MODEL", "messages": [{"role": "user", "content": '
                       '[{"type": "text", "text": "a\\ud800b"}]}]}', "messages[0].content[0]"),
    "guided_json not JSON": ({"messages": user("hi"), "guided_json": "{not json"}, "guided_json: "),
    "guided_json nested 10000": ({"messages": user("hi"), "guided_json": "[" * 10000}, "guided_json: "),
    "guided_choice empty": ({"messages": user("hi"), "guided_choice": []}, "guided_choice: "),
    "tool role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role: 'tool'"),
    "n 2": ({"messages": user("hi"), "n": 2}, "n: 2 choices"),
    "max_partition 10000": ({"messages": image_then("hi"), "mm_processor_kwargs": {"max_partition": 10000}},
                            "max_partition: 10000 is over the limit of 16"),
    "invalid base64": ({"messages": user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}])},
                       "messages[0].content[0]"),
    "10 MB of text": ({"messages": user("word " * 2_000_000)}, "messages: the text holds over"),
}


@pytest.fixture(scope="module")
def server():
    # The CPU's own dtype choice: these checks hold in either, and one server test runs it.
    with local_server(extra_env={"OVIS2_XINF_CPU_DTYPE": "auto"}) as running:
        yield running


@pytest.fixture(scope="module")
def uid(server) -> str:
    return server.launch("--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "2",
                         "--model-format", "pytorch", "--model-path", str(TINY))


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"{server.endpoint}/v1", timeout=120) as client:
        yield client


def post(http, uid: str, body, stream: bool = False) -> httpx.Response:
    if isinstance(body, str):
        text = body.replace('"MODEL"', json.dumps(uid))
    else:
        text = json.dumps({"model": uid, **body, **({"stream": True} if stream else {})})
    return http.post("/chat/completions", content=text, headers={"content-type": "application/json"})


def known_answer(http, uid: str) -> str:
    reply = post(http, uid, KNOWN)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def expected(http, uid) -> str:
    return known_answer(http, uid)


def model_process(server) -> psutil.Process:
    """The model's own process: the server's descendant that holds the most memory."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return max(children, key=lambda p: p.memory_info().rss)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_bad_request_is_a_400_naming_its_field(http, uid, expected, name):
    body, needle = CASES[name]
    started = time.monotonic()
    reply = post(http, uid, body)
    assert reply.status_code == 400, reply.text
    assert needle in reply.json()["detail"]
    assert time.monotonic() - started < 15  # refused before the work, not after it
    if isinstance(body, dict):  # the same request streaming: refused before the first byte
        streamed = post(http, uid, body, stream=True)
        assert streamed.status_code == 400, streamed.text
        assert needle in streamed.json()["detail"]
    assert known_answer(http, uid) == expected


def test_refused_huge_text_frees_the_model_process_memory(server, http, uid):
    process = model_process(server)
    post(http, uid, CASES["10 MB of text"][0])  # warm: buffers a first request of this size allocates
    before = process.memory_info().rss
    for _ in range(3):
        assert post(http, uid, CASES["10 MB of text"][0]).status_code == 400
    assert process.memory_info().rss - before < 100 * 2**20


def test_a_client_error_logs_one_warning_line_and_no_traceback(server, http, uid):
    marker = "log-check-%d" % time.time_ns()
    reply = post(http, uid, {"messages": user([{"type": "audio_url", "audio_url": {"url": marker}}])})
    assert reply.status_code == 400
    reply = post(http, uid, {"messages": user("hi"), "top_p": 7.5, "user": marker})
    assert reply.status_code == 400
    time.sleep(1)
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "refused a chat request" in line]
    assert any(" WARNING " in line and "audio_url" in line for line in lines)
    assert not [line for line in log.splitlines() if " ERROR " in line and "chat" in line.lower()]


# --- property: whatever a client sends, 200 or 400 naming a field ---------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                    st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=12)
# Any code point, lone surrogates included (json.dumps escapes them as \udXXX, which the server's parser accepts).
UNICODE = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()),
                  max_size=40)


def maybe(valid):
    return st.one_of(valid, JSON)


PART = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text"]), "text": maybe(UNICODE)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "image"]),
                           "image_url": maybe(st.fixed_dictionaries({"url": st.one_of(
                               st.just(IMAGE), st.just("data:image/png;base64,%%"), UNICODE)}))}),
    st.fixed_dictionaries({"type": maybe(UNICODE)}),
    JSON,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), UNICODE, JSON),
     "content": st.one_of(UNICODE, st.lists(PART, max_size=3), JSON)})
FIELDS = {
    "messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=3).map(lambda m: m + user("hi")),
                          st.lists(MESSAGE, max_size=3), JSON),
    "max_tokens": maybe(st.integers(-2, 6)),
    "temperature": maybe(st.floats(-1, 3)),
    "top_p": maybe(st.floats(-0.5, 1.5)),
    "top_k": maybe(st.integers(-3, 100)),
    "seed": maybe(st.integers(-(2**64), 2**64)),
    "stop": maybe(st.one_of(UNICODE, st.lists(UNICODE, max_size=3))),
    "stop_token_ids": maybe(st.lists(st.integers(-5, 10**6), max_size=3)),
    "repetition_penalty": maybe(st.floats(-1, 200)),
    "frequency_penalty": maybe(st.floats(-3, 3)),
    "presence_penalty": maybe(st.floats(-3, 3)),
    "logprobs": maybe(st.booleans()),
    "top_logprobs": maybe(st.integers(-2, 30)),
    "n": maybe(st.integers(-1, 3)),
    "stream": st.booleans(),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "response_format": maybe(st.fixed_dictionaries({
        "type": st.sampled_from(["text", "json_object", "json_schema", "xml"]),
        "json_schema": maybe(st.fixed_dictionaries({"name": st.just("x"), "schema": JSON}))})),
    "guided_json": maybe(UNICODE),
    "guided_choice": maybe(st.lists(UNICODE, max_size=3)),
    "guided_regex": maybe(UNICODE),
    "mm_processor_kwargs": maybe(st.fixed_dictionaries({"max_partition": maybe(st.integers(-3, 10**6)),
                                                        "video_frames": maybe(st.integers(-3, 100))})),
    "chat_template_kwargs": JSON,
    "ignore_eos": maybe(st.booleans()),
    "tools": JSON,
}
BODIES = st.fixed_dictionaries({"max_tokens": FIELDS["max_tokens"]},
                               optional={k: v for k, v in FIELDS.items() if k != "max_tokens"})
FIELD_NAME = re.compile(r"^([A-Za-z_]+)")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=BODIES)
def test_any_body_gets_200_or_a_400_naming_a_field(http, uid, expected, body):
    # Answers stay short: max_tokens is always sent, and a valid one is at most 6.
    reply = post(http, uid, body)
    assert reply.status_code in (200, 400), (reply.status_code, reply.text[:500])
    if reply.status_code == 400:
        detail = reply.json()["detail"]
        field = FIELD_NAME.match(detail)
        assert field and field.group(1) in {*body, "body", "messages"}, detail
    elif body.get("stream"):
        assert '"error"' not in reply.text, reply.text[:500]
    else:
        assert reply.json()["choices"][0]["message"]["role"] == "assistant"


def test_after_the_property_the_known_answer_is_unchanged(http, uid, expected, server):
    assert known_answer(http, uid) == expected
    assert server.process.poll() is None


def test_the_model_logs_the_dtype_it_chose_for_this_cpu(server, uid):
    choice = re.search(r"Ovis2 on CPU computes in (bfloat16|float32) \(auto", server.log_path.read_text(errors="replace"))
    assert choice, "no dtype choice in the log"
