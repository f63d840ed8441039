"""Fuzzing the message and image paths: a valid prompt or a clear error, never a crash or a hang."""

from __future__ import annotations

import base64
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import TINY
from ovis2_xinf.checkpoint import PlaceholderIds
from ovis2_xinf.errors import Ovis2RequestError
from ovis2_xinf.loader import load_tokenizer
from ovis2_xinf.media import MediaLimits, decode_image
from ovis2_xinf.messages import build_conversation
from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor
from ovis2_xinf.prompt import encode

LIMITS = MediaLimits(max_image_pixels=4_000_000, max_images=4, video_frames=2, max_video_frames=4)
TOKENIZER = load_tokenizer(TINY)
PREPROCESSOR = Ovis2ImagePreprocessor.from_pretrained(TINY)
# As a model load does: the deadlines below are about each message, not numba's one-time compile
# (the first image otherwise took 8.3 s in a fresh clone's test run).
PREPROCESSOR.warm_up()
PLACEHOLDERS = PlaceholderIds.after_tokenizer(547, 576)


def _png(width: int, height: int, mode: str) -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


VALID_IMAGE = _png(20, 10, "RGB")
texts = st.one_of(st.text(max_size=40), st.just(""), st.just("x" * 20_000), st.just("<image>"),
                  st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=10))
urls = st.one_of(
    st.just(VALID_IMAGE),
    st.builds(_png, st.integers(1, 120), st.integers(1, 120), st.sampled_from(["RGB", "RGBA", "L", "P", "1", "I;16"])),
    st.just("data:image/png;base64,!!!"), st.just("data:image/png;base64,"), st.just("data:,hello"),
    st.binary(max_size=64).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
    st.just(""), st.just("ftp://example.com/a.png"), st.just("/etc/passwd"), st.just("javascript:alert(1)"),
    st.text(max_size=30),
)
parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, urls),
    st.builds(lambda u: {"type": "image_url", "image_url": u}, urls),
    st.builds(lambda k: {"type": k}, st.sampled_from(["audio_url", "input_audio", "", "image_url", "text", "file"])),
    st.dictionaries(st.text(max_size=5), st.one_of(st.none(), st.integers(), st.text(max_size=5)), max_size=3),
    st.none(), st.integers(), st.text(max_size=5),
)
contents = st.one_of(texts, st.lists(parts, max_size=5), st.none(), st.integers(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "function", "", "USER"]),
                               "content": contents}),
        st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        st.none(), st.text(max_size=5),
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_any_messages_give_a_prompt_or_a_clear_error(value):
    try:
        conversation = build_conversation(value, LIMITS)
    except Ovis2RequestError as exc:
        assert str(exc) and not str(exc).startswith("Traceback")
        return
    processed = [PREPROCESSOR(image, conversation.max_partition) for image in conversation.images]
    encoded = encode(TOKENIZER, conversation.turns, processed, PLACEHOLDERS, 4)
    assert encoded.input_ids.shape[0] == 1 and encoded.input_ids.max() < 576
    assert encoded.prompt.endswith("<|im_start|>assistant\n")


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
