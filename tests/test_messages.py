"""OpenAI messages to Ovis turns: layout rules and request validation (no model needed)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from ovis2_xinf.errors import Ovis2LimitError, Ovis2RequestError
from ovis2_xinf.media import MediaLimits, describe_url
from ovis2_xinf.messages import build_conversation, parse_messages

LIMITS = MediaLimits()


def png_url(size=(40, 30), color=(10, 200, 30), mode="RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image(url=None):
    return {"type": "image_url", "image_url": {"url": url or png_url()}}


def text(value):
    return {"type": "text", "text": value}


def test_text_only_keeps_roles_and_no_partition():
    conv = build_conversation(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": [text("again")]}], LIMITS)
    assert [(t.speaker, t.text) for t in conv.turns] == [
        ("system", "Be brief."), ("human", "hi"), ("gpt", "hello"), ("human", "again")]
    assert conv.images == [] and conv.max_partition is None


def test_single_image_before_text():
    conv = build_conversation([{"role": "user", "content": [image(), text("Describe the image.")]}], LIMITS)
    assert conv.turns[0].text == "<image>\nDescribe the image."
    assert conv.max_partition == 9 and len(conv.images) == 1


def test_interleaved_order_is_kept():
    conv = build_conversation([{"role": "user", "content": [text("First:"), image(), text("Then?")]}], LIMITS)
    assert conv.turns[0].text == "First:\n<image>\nThen?"


def test_several_images_in_a_turn_are_numbered():
    conv = build_conversation([{"role": "user", "content": [image(), image(), text("Compare them.")]}], LIMITS)
    assert conv.turns[0].text == "Image 1: <image>\nImage 2: <image>\nCompare them."
    assert conv.max_partition == 4


def test_images_stay_in_their_turns():
    conv = build_conversation([
        {"role": "user", "content": [image(png_url(color=(255, 0, 0))), text("What is it?")]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [image(png_url(color=(0, 0, 255))), text("And this?")]},
    ], LIMITS)
    assert [t.text for t in conv.turns] == ["<image>\nWhat is it?", "A red square.", "<image>\nAnd this?"]
    assert [im.getpixel((0, 0)) for im in conv.images] == [(255, 0, 0), (0, 0, 255)]
    assert conv.max_partition == 4


def test_override_max_partition():
    conv = build_conversation([{"role": "user", "content": [image(), text("x")]}], LIMITS, max_partition=2)
    assert conv.max_partition == 2


@pytest.mark.parametrize(
    "messages,needle",
    [
        ([], "messages: need a non-empty list"),
        ([{"role": "tool", "content": "x"}], "messages[0].role: 'tool' is not supported"),
        ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}],
         "messages[0].content[0]: unsupported content type 'audio_url'"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0]: a text part needs a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
         "messages[0].content[0]: image_url needs a non-empty url"),
        ([{"role": "user", "content": 5}], "messages[0].content: must be a string or a list"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must come from the user"),
        ([{"role": "assistant", "content": [image()]}, {"role": "user", "content": "x"}],
         "messages[0].content[0]: image_url is only accepted in user messages"),
        (["hello"], "messages[0]: each message must be an object"),
    ],
)
def test_malformed_requests_name_the_place(messages, needle):
    with pytest.raises(Ovis2RequestError) as info:
        build_conversation(messages, LIMITS)
    assert needle in str(info.value)


def test_image_marker_in_text_is_refused():
    with pytest.raises(Ovis2RequestError, match="reserved marker <image>"):
        build_conversation([{"role": "user", "content": "look <image> here"}], LIMITS)


def test_media_errors_name_part_and_limit():
    broken = "data:image/png;base64,!!!notbase64"
    with pytest.raises(Ovis2RequestError, match=r"messages\[0\]\.content\[1\]: data:image/png;base64,\.\.\.: Invalid base64"):
        build_conversation([{"role": "user", "content": [text("x"), image(broken)]}], LIMITS)
    not_image = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    with pytest.raises(Ovis2RequestError, match="not a decodable image"):
        build_conversation([{"role": "user", "content": [image(not_image)]}], LIMITS)
    with pytest.raises(Ovis2LimitError, match=r"2000x2000 is 4000000 pixels, over the limit of 1000000 \(OVIS2_XINF_MAX_IMAGE_PIXELS\)"):
        build_conversation([{"role": "user", "content": [image(png_url((2000, 2000)))]}],
                           MediaLimits(max_image_pixels=1_000_000))
    with pytest.raises(Ovis2LimitError, match=r"3 images in one request, over the limit of 2 \(OVIS2_XINF_MAX_IMAGES\)"):
        build_conversation([{"role": "user", "content": [image(), image(), image()]}], MediaLimits(max_images=2))


def test_local_paths_need_xinference_permission(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    monkeypatch.delenv("XINFERENCE_MEDIA_ALLOW_LOCAL_PATH", raising=False)
    with pytest.raises(Ovis2RequestError, match="Local file media urls are rejected"):
        build_conversation([{"role": "user", "content": [image(str(path))]}], LIMITS)
    monkeypatch.setenv("XINFERENCE_MEDIA_ALLOW_LOCAL_PATH", "true")
    conv = build_conversation([{"role": "user", "content": [image(str(path))]}], LIMITS)
    assert conv.images[0].size == (8, 8)


def test_limits_from_env(monkeypatch):
    monkeypatch.setenv("OVIS2_XINF_MAX_IMAGES", "3")
    monkeypatch.setenv("OVIS2_XINF_VIDEO_FRAMES", "6")
    limits = MediaLimits.from_env()
    assert limits.max_images == 3 and limits.video_frames == 6
    monkeypatch.setenv("OVIS2_XINF_MAX_IMAGES", "zero")
    with pytest.raises(ValueError, match="OVIS2_XINF_MAX_IMAGES='zero' is not an integer"):
        MediaLimits.from_env()


def test_describe_url_shortens_data_urls():
    assert describe_url("data:image/png;base64," + "A" * 5000) == "data:image/png;base64,..."
    assert len(describe_url("https://example.com/" + "x" * 200)) == 60


def test_parse_accepts_string_image_url_and_null_assistant_content():
    parsed = parse_messages([{"role": "assistant", "content": None},
                             {"role": "user", "content": [{"type": "image_url", "image_url": "https://a.b/c.png"}]}])
    assert parsed[1].parts[0].url == "https://a.b/c.png"


# --- fetch policy: Xinference's fetcher, our limits on top ---------------------------------

import http.server
import threading

from conftest import CASES_DIR


@pytest.fixture
def web(monkeypatch):
    """Loopback HTTP server with an image, a redirect loop and a large file."""
    monkeypatch.setenv("XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS", "false")
    image = (CASES_DIR / "images" / "wide.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/loop"):
                self.send_response(302)
                self.send_header("Location", f"/loop{len(self.path)}")
                self.end_headers()
                return
            body = image if self.path == "/wide.png" else b"x" * 5000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_fetch_and_its_limits(web, monkeypatch):
    conv = build_conversation([{"role": "user", "content": [image(f"{web}/wide.png")]}], LIMITS)
    assert conv.images[0].size == (200, 100)
    with pytest.raises(Ovis2LimitError, match="Too many redirects.*at most 5 redirects"):
        build_conversation([{"role": "user", "content": [image(f"{web}/loop")]}], LIMITS)
    monkeypatch.setenv("XINFERENCE_MEDIA_MAX_BYTES", "1000")
    with pytest.raises(Ovis2LimitError, match="Media exceeds 1000 bytes.*setting: XINFERENCE_MEDIA_MAX_BYTES"):
        build_conversation([{"role": "user", "content": [image(f"{web}/big.bin")]}], LIMITS)
    noise = io.BytesIO()
    Image.effect_noise((300, 300), 64).save(noise, format="PNG")
    noisy_url = "data:image/png;base64," + base64.b64encode(noise.getvalue()).decode()
    with pytest.raises(Ovis2LimitError, match="over XINFERENCE_MEDIA_MAX_BYTES=1000"):
        build_conversation([{"role": "user", "content": [image(noisy_url)]}], LIMITS)


def test_private_addresses_refused_by_default(web, monkeypatch):
    monkeypatch.delenv("XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS")
    with pytest.raises(Ovis2RequestError, match=r"messages\[0\]\.content\[0\]: http://127\.0\.0\.1"):
        build_conversation([{"role": "user", "content": [image(f"{web}/wide.png")]}], LIMITS)


def test_local_directory_allowance(tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    Image.new("RGB", (9, 7)).save(allowed / "a.png")
    Image.new("RGB", (9, 7)).save(tmp_path / "outside.png")
    monkeypatch.delenv("XINFERENCE_MEDIA_ALLOW_LOCAL_PATH", raising=False)
    monkeypatch.setenv("OVIS2_XINF_MEDIA_LOCAL_DIR", str(allowed))
    assert build_conversation([{"role": "user", "content": [image(str(allowed / "a.png"))]}], LIMITS).images[0].size == (9, 7)
    assert build_conversation([{"role": "user", "content": [image(f"file://{allowed / 'a.png'}")]}], LIMITS).images
    for outside in (str(tmp_path / "outside.png"), str(allowed / ".." / "outside.png")):
        with pytest.raises(Ovis2LimitError, match="setting: OVIS2_XINF_MEDIA_LOCAL_DIR"):
            build_conversation([{"role": "user", "content": [image(outside)]}], LIMITS)


def test_video_frames_limit_is_checked_before_fetching():
    video = {"type": "video_url", "video_url": {"url": "https://unreachable.invalid/v.mp4"}}
    with pytest.raises(Ovis2LimitError, match=r"2 video\(s\) x 12 frames is over the limit of 20 .*OVIS2_XINF_MAX_VIDEO_FRAMES"):
        build_conversation([{"role": "user", "content": [video, video]}], MediaLimits(max_video_frames=20))
