"""Fuzzing the message and image paths: a valid prompt or a clear error, never a crash or a hang."""

from __future__ import annotations

import base64
import importlib
import io
import os
import socket
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import TINY
from ovis2_xinf.checkpoint import PlaceholderIds
from ovis2_xinf.errors import Ovis2RequestError
from ovis2_xinf.loader import load_tokenizer
from ovis2_xinf.media import MediaLimits, decode_image
from ovis2_xinf.messages import TEXT_TYPES, build_conversation
from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor
from ovis2_xinf.prompt import encode

LIMITS = MediaLimits(max_image_pixels=4_000_000, max_images=4, video_frames=2, max_video_frames=4)
TOKENIZER = load_tokenizer(TINY)
PREPROCESSOR = Ovis2ImagePreprocessor.from_pretrained(TINY)
# As a model load does: the deadlines below are about each message, not numba's one-time compile
# (the first image otherwise took 8.3 s in a fresh clone's test run).
PREPROCESSOR.warm_up()
# Fetching imports Xinference on first use, which is no example's cost either.
importlib.import_module("xinference.model.llm.media")
PLACEHOLDERS = PlaceholderIds.after_tokenizer(547, 576)


def _png(width: int, height: int, mode: str) -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


VALID_IMAGE = _png(20, 10, "RGB")
# Every code point, lone surrogates included: Python's json parser turns "\ud800" into one.
any_unicode = st.text(alphabet=st.characters(exclude_categories=()), max_size=30)
lone_surrogate = st.builds(lambda a, c, b: a + c + b, st.text(max_size=5), st.characters(categories=["Cs"]),
                           st.text(max_size=5))
hostile = st.one_of(any_unicode, lone_surrogate)
json_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hostile,
                        st.lists(hostile, max_size=2), st.dictionaries(hostile, hostile, max_size=2))
texts = st.one_of(st.text(max_size=40), st.just(""), st.just("x" * 20_000), st.just("<image>"), hostile,
                  st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=10))
# Hostile URLs only reach addresses refused before connecting (the loopback) or no address at all.
url_templates = st.sampled_from(["{}", "http://127.0.0.1/{}", "https://127.0.0.1:8/a{}.png", "file://{}",
                                 "data:image/png;base64,{}", "data:{}", VALID_IMAGE + "{}"])
urls = st.one_of(
    st.builds(lambda template, value: template.format(value), url_templates, hostile),
    st.just(VALID_IMAGE),
    st.builds(_png, st.integers(1, 120), st.integers(1, 120), st.sampled_from(["RGB", "RGBA", "L", "P", "1", "I;16"])),
    st.just("data:image/png;base64,!!!"), st.just("data:image/png;base64,"), st.just("data:,hello"),
    st.binary(max_size=64).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
    st.just(""), st.just("ftp://example.com/a.png"), st.just("/etc/passwd"), st.just("javascript:alert(1)"),
    st.text(max_size=30),
)
types = st.one_of(st.sampled_from(["text", "input_text", "image_url", "image", "video_url", "video", "audio_url"]),
                  hostile, json_values)
parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, urls),
    st.builds(lambda u: {"type": "image_url", "image_url": u}, urls),
    st.builds(lambda u: {"type": "video_url", "video_url": {"url": u}}, urls),
    st.builds(lambda k, t, u: {"type": k, "text": t, "image_url": {"url": u}, "video_url": u}, types, texts, urls),
    st.builds(lambda k: {"type": k}, st.sampled_from(["audio_url", "input_audio", "", "image_url", "text", "file"])),
    st.dictionaries(st.text(max_size=5), st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=3),
    st.none(), st.integers(), st.text(max_size=5),
)
contents = st.one_of(texts, st.lists(parts, max_size=5), st.none(), st.integers(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.one_of(
            st.sampled_from(["user", "assistant", "system", "tool", "function", "", "USER"]), hostile, json_values),
            "content": contents}),
        st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        st.none(), st.text(max_size=5),
    ),
    max_size=5,
)


REAL_GETADDRINFO = socket.getaddrinfo


def _numeric_only(host, port, family=0, type=0, proto=0, flags=0):
    """Resolve IP literals only: a random URL must not send a DNS query."""
    return REAL_GETADDRINFO(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)


def _prompt_or_clear_error(value) -> None:
    """A prompt the tokenizer encodes, or an Ovis2RequestError; and never a connection or a DNS query."""
    assert os.environ.get("XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS", "true").lower() in ("true", "1", "yes", "on")
    connections = []
    with mock.patch.object(socket.socket, "connect", lambda sock, address: connections.append(address)), \
            mock.patch.object(socket, "getaddrinfo", _numeric_only):
        try:
            conversation = build_conversation(value, LIMITS)
        except Ovis2RequestError as exc:
            assert str(exc) and not str(exc).startswith("Traceback")
            str(exc).encode("utf-8")  # the message can be sent back
            event("a clear error")
            return
        finally:
            assert connections == []
    processed = [PREPROCESSOR(image, conversation.max_partition) for image in conversation.images]
    encoded = encode(TOKENIZER, conversation.turns, processed, PLACEHOLDERS, 4)
    assert encoded.input_ids.shape[0] == 1 and encoded.input_ids.max() < 576
    assert encoded.prompt.endswith("<|im_start|>assistant\n")
    event("a prompt with images" if processed else "a prompt")


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_any_messages_give_a_prompt_or_a_clear_error(value):
    _prompt_or_clear_error(value)


# Well-formed messages but for a few fields: hostile strings then reach the tokenizer.
def _mostly(valid, hostile_values):
    return st.integers(0, 3).flatmap(lambda draw: hostile_values if draw == 0 else valid)


_text_parts = st.builds(lambda k, t: {"type": k, "text": t}, _mostly(st.sampled_from(TEXT_TYPES), hostile),
                        _mostly(any_unicode, lone_surrogate))
_media_parts = st.builds(lambda k, u: {"type": k, k: {"url": u}}, st.sampled_from(["image_url", "video_url"]),
                         _mostly(st.just(VALID_IMAGE), urls))
_contents = st.one_of(_mostly(any_unicode, lone_surrogate), st.lists(st.one_of(_text_parts, _media_parts),
                                                                     min_size=1, max_size=3))
_turns = st.fixed_dictionaries({"role": _mostly(st.sampled_from(["system", "user", "assistant"]), hostile),
                                "content": _contents})


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_turns, max_size=2), _contents)
def test_hostile_strings_in_every_field_give_a_prompt_or_a_clear_error(earlier, last):
    _prompt_or_clear_error(earlier + [{"role": "user", "content": last}])


@settings(max_examples=200, deadline=2000)
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_image_decoder(data):
    try:
        image = decode_image(data, "fuzz", LIMITS)
    except Ovis2RequestError:
        return
    PREPROCESSOR(image, 4)


@pytest.mark.parametrize("header", [b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff\xe0"])
def test_truncated_real_images_are_clear_errors(header):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format={b"G": "GIF", b"\x89": "PNG", b"\xff": "JPEG"}[header[:1]])
    data = buffer.getvalue()
    assert data.startswith(header[:3])
    with pytest.raises(Ovis2RequestError, match="fuzz: "):
        decode_image(data[: len(data) // 2], "fuzz", LIMITS)


def test_decompression_bomb_is_refused_from_the_header():
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, format="PNG")  # 400 M pixels in ~50 KB
    with pytest.raises(Ovis2RequestError, match=r"400000000 pixels.*OVIS2_XINF_MAX_IMAGE_PIXELS"):
        decode_image(buffer.getvalue(), "fuzz", LIMITS)
    buffer = io.BytesIO()
    Image.new("1", (3000, 2000)).save(buffer, format="PNG")  # over our limit, under PIL's own guard
    with pytest.raises(Ovis2RequestError, match=r"3000x2000 is 6000000 pixels, over the limit of 4000000"):
        decode_image(buffer.getvalue(), "fuzz", LIMITS)
