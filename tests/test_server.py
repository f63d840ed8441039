"""End to end: a real ``xinference-local`` on loopback, talked to with the ``openai`` client."""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
from pathlib import Path

import httpx
import pytest
from openai import APIError, BadRequestError, OpenAI
from PIL import Image

from conftest import CASES_DIR, TINY
from ovis2_xinf.catalog import resolve_all
from ovis2_xinf.local_server import free_port, local_server
from ovis2_xinf.loader import load_tokenizer

pytestmark = pytest.mark.integration
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}


def data_url(path: Path, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


@pytest.fixture(scope="module")
def image_host():
    """A loopback HTTP server for the fixture images."""
    directory = str(CASES_DIR / "images")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def server():
    # Loopback image URLs are private addresses: allowed here for the test host only.
    with local_server(extra_env={"XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS": "false"}) as running:
        yield running


@pytest.fixture(scope="module")
def uid(server) -> str:
    return server.launch(
        "--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "2",
        "--model-format", "pytorch", "--model-path", str(TINY),
    )


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.endpoint}/v1", api_key="not-needed", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def cases():
    return json.loads((CASES_DIR / "cases.json").read_text())["cases"]


def expected_text(tokenizer, case) -> str:
    return tokenizer.decode(case["greedy_ids"], skip_special_tokens=True)


# --- registration over HTTP --------------------------------------------------------------

def test_family_listed_as_builtin_with_our_specs(server):
    registrations = httpx.get(f"{server.endpoint}/v1/model_registrations/LLM", params={"detailed": "true"}, timeout=60).json()
    ovis = [r for r in registrations if r["model_name"] == "Ovis2"]
    assert len(ovis) == 1 and ovis[0]["is_builtin"] is True
    family = ovis[0]
    assert family["model_ability"] == ["chat", "vision"] and family["context_length"] == 32768
    assert family["model_type"] == "ovis" and family["chat_template"].startswith("{%- if tools %}")
    assert family["virtualenv"]["packages"][0] == '#transformers_dependencies# ; #engine# == "Transformers"'
    assert all(s["model_metadata"]["architecture_type"] == "multimodal" for s in family["model_specs"])
    listed = sorted((s["model_hub"], s["model_format"], s["model_size_in_billions"], s["quantization"], s["model_id"])
                    for s in family["model_specs"])
    assert listed == sorted((r.hub, r.model_format, r.model_size_in_billions, r.quantization, r.model_id)
                            for r in resolve_all())


def test_engines_offer_transformers_for_all_eleven_choices(server):
    engines = httpx.get(f"{server.endpoint}/v1/engines/Ovis2", timeout=60).json()
    choices = sorted((p["model_format"], p["model_size_in_billions"], tuple(p["quantizations"]))
                     for p in engines["Transformers"])
    expected = [("pytorch", n, ("none",)) for n in (1, 2, 4, 8, 16, 34)]
    expected += [("gptq", n, ("Int4",)) for n in (2, 4, 8, 16)] + [("gptq", 34, ("Int4", "Int8"))]
    assert choices == sorted(expected)


# --- chat ------------------------------------------------------------------------------

def test_text_only_matches_original_greedy(client, uid, tokenizer, cases):
    case = cases["text_only"]
    reply = client.chat.completions.create(
        model=uid, messages=[{"role": "user", "content": "hello, who are you?"}], max_tokens=8, **GREEDY)
    assert reply.choices[0].message.content == expected_text(tokenizer, case)
    assert reply.usage.prompt_tokens == len(case["input_ids"])
    assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"


def test_one_image_data_url_matches_original_greedy(client, uid, tokenizer, cases):
    case = cases["single_wide"]
    reply = client.chat.completions.create(
        model=uid, max_tokens=8, **GREEDY,
        messages=[{"role": "user", "content": [image_part(data_url(CASES_DIR / "images" / "wide.png")),
                                                text_part("Describe the image.")]}])
    assert reply.choices[0].message.content == expected_text(tokenizer, case)
    # visual tokens count: 9 crops x 4 tokens replace 9 atoms in the original ids
    assert reply.usage.prompt_tokens == len(case["input_ids"]) + 9 * 3


def test_two_images_match_original_greedy(client, uid, tokenizer, cases):
    images = CASES_DIR / "images"
    reply = client.chat.completions.create(
        model=uid, max_tokens=8, **GREEDY,
        messages=[{"role": "user", "content": [image_part(data_url(images / "wide.png")),
                                                image_part(data_url(images / "tall.png")),
                                                text_part("Compare them.")]}])
    assert reply.choices[0].message.content == expected_text(tokenizer, cases["multi_image"])


def test_multi_turn_with_image_in_first_turn(client, uid, tokenizer, cases):
    reply = client.chat.completions.create(
        model=uid, max_tokens=8, **GREEDY,
        messages=[
            {"role": "user", "content": [image_part(data_url(CASES_DIR / "images" / "wide.png")),
                                         text_part("Describe the image.")]},
            {"role": "assistant", "content": "It shows a red car on the road."},
            {"role": "user", "content": "What color is the sky?"},
        ])
    assert reply.choices[0].message.content == expected_text(tokenizer, cases["multi_turn"])


def test_system_prompt(client, uid, tokenizer, cases):
    reply = client.chat.completions.create(
        model=uid, max_tokens=8, **GREEDY,
        messages=[{"role": "system", "content": "You answer in one short sentence."},
                  {"role": "user", "content": [image_part(data_url(CASES_DIR / "images" / "square.png")),
                                               text_part("What color is it?")]}])
    assert reply.choices[0].message.content == expected_text(tokenizer, cases["system_prompt"])


def lossless_video(tmp_path: Path) -> Path:
    """The fixture's four frames in a lossless video, written by PyAV."""
    import av

    path = tmp_path / "frames.mkv"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr0"
        for index in range(4):
            frame = av.VideoFrame.from_image(Image.open(CASES_DIR / "images" / f"frame{index}.png").convert("RGB"))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_frames_match_original_greedy(client, uid, tokenizer, cases, tmp_path):
    video = lossless_video(tmp_path)
    reply = client.chat.completions.create(
        model=uid, max_tokens=8, **GREEDY,
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_url(video, "video/x-matroska")}},
            text_part("What happens?")]}])
    assert reply.choices[0].message.content == expected_text(tokenizer, cases["video"])


def test_http_image_url(client, uid, image_host, tokenizer, cases):
    reply = client.chat.completions.create(
        model=uid, max_tokens=8, **GREEDY,
        messages=[{"role": "user", "content": [image_part(f"{image_host}/wide.png"), text_part("Describe the image.")]}])
    assert reply.choices[0].message.content == expected_text(tokenizer, cases["single_wide"])


def test_streaming_equals_non_streaming_for_the_same_seed(client, uid):
    messages = [{"role": "user", "content": [image_part(data_url(CASES_DIR / "images" / "square.png")),
                                             text_part("Describe the image.")]}]
    whole = client.chat.completions.create(model=uid, messages=messages, max_tokens=16, seed=1234, temperature=0.9)
    stream = client.chat.completions.create(model=uid, messages=messages, max_tokens=16, seed=1234, temperature=0.9,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == whole.usage.completion_tokens


def test_sampling_is_not_forced_greedy(client, uid):
    messages = [{"role": "user", "content": "hello, who are you?"}]
    answers = {client.chat.completions.create(model=uid, messages=messages, max_tokens=12, seed=s, temperature=1.5)
               .choices[0].message.content for s in range(4)}
    assert len(answers) > 1


def test_stop_string_and_finish_reason(client, uid, tokenizer, cases):
    full = expected_text(tokenizer, cases["text_only"])
    stop = full[3:6]
    reply = client.chat.completions.create(
        model=uid, messages=[{"role": "user", "content": "hello, who are you?"}], max_tokens=8, stop=[stop], **GREEDY)
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_per_request_max_partition(client, uid):
    messages = [{"role": "user", "content": [image_part(data_url(CASES_DIR / "images" / "wide.png")), text_part("x")]}]
    default = client.chat.completions.create(model=uid, messages=messages, max_tokens=1)
    one = client.chat.completions.create(model=uid, messages=messages, max_tokens=1,
                                         extra_body={"mm_processor_kwargs": {"max_partition": 1}})
    # grid 2x4 -> 1x1: 8 fewer crops of 4 tokens, 6 column and 1 row separators fewer
    assert default.usage.prompt_tokens - one.usage.prompt_tokens == 8 * 4 + 7


# --- bad input: a clear 400, and the model keeps serving -----------------------------------

BAD_INPUTS = {
    "broken base64": ([image_part("data:image/png;base64,!!!not-base64"), text_part("x")], "Invalid base64"),
    "not an image": ([image_part("data:text/plain;base64," + base64.b64encode(b"hello").decode())],
                     "not a decodable image"),
    "unreachable URL": ([image_part(f"http://127.0.0.1:{free_port()}/missing.png")], "cannot fetch http://127.0.0.1:"),
    "unknown content type": ([{"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}],
                             "unsupported content type 'audio_url'"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_400_and_serving_continues(client, uid, name):
    content, needle = BAD_INPUTS[name]
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=uid, messages=[{"role": "user", "content": content}], max_tokens=4)
    detail = info.value.response.json()["detail"]
    assert needle in detail and detail.startswith("messages[0].content[")
    with pytest.raises(APIError) as streamed:
        list(client.chat.completions.create(model=uid, messages=[{"role": "user", "content": content}],
                                            max_tokens=4, stream=True))
    assert needle in str(streamed.value.body or streamed.value)
    ok = client.chat.completions.create(model=uid, messages=[{"role": "user", "content": "still there?"}], max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def test_prompt_over_context_length_is_refused(client, uid):
    long_text = "word " * 5000
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model=uid, messages=[{"role": "user", "content": long_text}], max_tokens=4)
    assert "reach the context length of 4096" in info.value.response.json()["detail"]


# --- continuous batching over HTTP ---------------------------------------------------------

def test_concurrent_mixed_requests_are_batched_and_each_gets_its_solo_answer(server, client, uid, tokenizer, cases):
    from concurrent.futures import ThreadPoolExecutor

    square = data_url(CASES_DIR / "images" / "square.png")
    seeded = [{"role": "user", "content": [image_part(square), text_part("Describe the image.")]}]

    def greedy_text():
        return client.chat.completions.create(model=uid, messages=[{"role": "user", "content": "hello, who are you?"}],
                                              max_tokens=8, **GREEDY).choices[0].message.content

    def sampled(stream: bool):
        kwargs = dict(model=uid, messages=seeded, max_tokens=24, seed=77, temperature=0.9, top_p=0.9)
        if not stream:
            reply = client.chat.completions.create(**kwargs)
            return reply.choices[0].message.content, reply.usage.completion_tokens, reply.choices[0].finish_reason
        pieces, usage, finish = [], None, None
        for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return "".join(pieces), usage.completion_tokens, finish

    def long_stream_given_up():
        stream = client.chat.completions.create(model=uid, messages=seeded, max_tokens=3000, stream=True,
                                                extra_body={"ignore_eos": True})
        for index, _ in enumerate(stream):
            if index == 3:
                stream.close()  # this client leaves; the others must not notice
                return "left"

    alone = sampled(False)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(long_stream_given_up)]
        futures += [pool.submit(sampled, i % 2 == 0) for i in range(4)] + [pool.submit(greedy_text) for _ in range(3)]
        results = [f.result(timeout=300) for f in futures]
    assert results[0] == "left"
    assert all(r == alone for r in results[1:5]), (results[1:5], alone)  # seeded: the same alone and batched
    assert all(r == expected_text(tokenizer, cases["text_only"]) for r in results[5:])
    peaks = [int(m) for m in re.findall(r"(\d+) rows decoding together", server.log_tail(2000))]
    assert peaks and max(peaks) >= 2, "the requests never shared a decode step"


def test_more_requests_than_xinference_pool_threads_decode_together(server, client, uid):
    """A request waiting for its tokens must not hold one of the model process's pool threads
    (``min(32, cores + 4)``), or no more than that many requests could ever decode at once."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    pool = min(32, (os.cpu_count() or 1) + 4)
    if pool + 3 > 16:
        pytest.skip(f"the model's max_num_seqs (16) is not above this machine's pool of {pool} threads")
    requests = pool + 6
    log = Path(server.log_path)
    offset = log.stat().st_size
    barrier = threading.Barrier(requests)

    def one(stream: bool) -> int:
        barrier.wait()
        kwargs = dict(model=uid, messages=[{"role": "user", "content": "count"}], max_tokens=400,
                      extra_body={"ignore_eos": True})
        if not stream:
            return client.chat.completions.create(**kwargs).usage.completion_tokens
        usage = None
        for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
            usage = chunk.usage or usage
        return usage.completion_tokens

    with ThreadPoolExecutor(requests) as threads:
        produced = list(threads.map(one, [i % 3 == 0 for i in range(requests)]))
    assert produced == [400] * requests
    with log.open() as handle:
        handle.seek(offset)
        peaks = [int(m) for m in re.findall(r"(\d+) rows decoding together", handle.read())]
    assert peaks and max(peaks) >= pool + 2, (peaks, pool)


def test_image_prefills_pausing_for_decode_steps_change_no_answer(server, client, uid, tokenizer, cases):
    """``--prefill_slice_ms`` tiny: each prefill next to a decoding stream pauses at every layer."""
    from concurrent.futures import ThreadPoolExecutor

    pausing = server.launch("--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "2",
                            "--model-format", "pytorch", "--model-path", str(TINY), "--model-uid", "ovis2-pausing",
                            "--prefill_slice_ms", "0.001")
    images = CASES_DIR / "images"
    asks = {
        "single_wide": [image_part(data_url(images / "wide.png")), text_part("Describe the image.")],
        "multi_image": [image_part(data_url(images / "wide.png")), image_part(data_url(images / "tall.png")),
                        text_part("Compare them.")],
    }
    long_ask = dict(messages=[{"role": "user", "content": "count"}], max_tokens=300, temperature=0,
                    extra_body={"ignore_eos": True, "repetition_penalty": 1.0})
    try:
        log = Path(server.log_path)
        offset = log.stat().st_size
        solo = client.chat.completions.create(model=pausing, **long_ask).choices[0].message.content
        stream = client.chat.completions.create(model=pausing, **long_ask, stream=True)
        pieces = [next(iter(stream)).choices[0].delta.content or ""]  # the stream is decoding now

        def ask(name: str) -> str:
            content = asks[name]
            return client.chat.completions.create(model=pausing, max_tokens=8, **GREEDY,
                                                  messages=[{"role": "user", "content": content}]).choices[0].message.content

        with ThreadPoolExecutor(2) as pool:
            answers = dict(zip(asks, pool.map(ask, asks)))
        pieces += [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert answers == {n: expected_text(tokenizer, cases[n]) for n in asks}
        assert "".join(pieces) == solo  # the decode steps run inside the prefills left the stream's answer alone
        with log.open() as handle:
            handle.seek(offset)
            assert re.search(r"a prefill paused \d+ times for a decode step", handle.read())
    finally:
        server.xinference("terminate", "--model-uid", pausing)


def test_turn_two_with_reuse_equals_a_model_without_reuse(server, client, uid):
    cold = server.launch("--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "2",
                         "--model-format", "pytorch", "--model-path", str(TINY), "--model-uid", "ovis2-no-reuse",
                         "--reuse_cache_mib", "0")
    try:
        image = image_part(data_url(CASES_DIR / "images" / "wide.png"))
        history = [{"role": "user", "content": [image, text_part("What is this?")]}]
        first = client.chat.completions.create(model=uid, messages=history, max_tokens=10, **GREEDY)
        history += [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And what colour is it?"}]
        warm = client.chat.completions.create(model=uid, messages=history, max_tokens=10, **GREEDY)
        again = client.chat.completions.create(model=cold, messages=history, max_tokens=10, **GREEDY)
        assert warm.choices[0].message.content == again.choices[0].message.content
        assert warm.usage.prompt_tokens == again.usage.prompt_tokens
        assert "reuse off" in server.log_tail(3000)  # the second model really ran without it
    finally:
        server.xinference("terminate", "--model-uid", cold)
