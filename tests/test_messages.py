"""OpenAI messages to Ovis turns: layout rules and request validation (no model needed)."""

from __future__ import annotations

import base64
import io
import os

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
import json
import socket
import threading
import time

from conftest import CASES_DIR


REDIRECTS = {"/noloc": None, "/toftp": "ftp://example.com/a.png"}


@pytest.fixture
def web(monkeypatch):
    """Loopback HTTP server with an image, redirects (a loop, none, to ftp), a slow answer, a 404 and a large file."""
    monkeypatch.setenv("XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS", "false")
    image = (CASES_DIR / "images" / "wide.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/loop") or self.path in REDIRECTS:
                self.send_response(302)
                location = REDIRECTS.get(self.path, f"/loop{len(self.path)}")
                if location:
                    self.send_header("Location", location)
                self.end_headers()
                return
            if self.path == "/missing":
                self.send_error(404)
                return
            if self.path == "/slow":
                time.sleep(1)
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


# --- every refusal of Xinference 4.1's fetcher names what the client or the admin can change ---


@pytest.fixture
def no_connections(monkeypatch):
    """Fail the test if anything opens a connection: these URLs must be refused before one."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise AssertionError(f"connected to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert attempts == []


def refusal(url, limits=LIMITS):
    with pytest.raises(Ovis2RequestError) as info:
        build_conversation([{"role": "user", "content": [text("look"), image(url)]}], limits)
    return info.value


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/a.png", "http://127.0.0.1:9/a.png", "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/a.png", "http://100.64.0.1/a.png", "https://192.168.1.1/a.png", "http://0.0.0.0/a.png",
])
def test_private_addresses_are_refused_before_connecting_naming_the_setting(url, no_connections, monkeypatch):
    monkeypatch.delenv("XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS", raising=False)
    error = refusal(url)
    assert isinstance(error, Ovis2LimitError)
    assert str(error).startswith(f"messages[0].content[1]: {url}: URL must resolve only to public addresses")
    assert str(error).endswith("(setting: XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS)")


@pytest.mark.parametrize("url,needle", [
    ("ftp://example.com/a.png", "Unsupported media url scheme: ftp (media urls may be http, https or data:; "
                                "local paths need OVIS2_XINF_MEDIA_LOCAL_DIR)"),
    ("gopher://example.com/a.png", "Unsupported media url scheme: gopher"),
    ("http://user:secret@example.com/a.png",
     "Expected a public HTTP(S) URL without credentials (media urls and their redirects must be http(s), "
     "name a host and carry no user:password)"),
    ("http:///a.png", "Expected a public HTTP(S) URL without credentials"),
])
def test_scheme_and_credential_refusals_come_before_any_io(url, needle, no_connections):
    error = refusal(url)
    assert str(error).startswith("messages[0].content[1]: ") and needle in str(error)


def test_unresolvable_hosts_are_a_clear_error(monkeypatch, no_connections):
    def unknown(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    assert "Cannot resolve media url host" in str(refusal("https://images.example/a.png"))


def test_fetch_refusals_of_the_redirect_and_answer(web, monkeypatch):
    assert "Missing redirect location" in str(refusal(f"{web}/noloc"))
    error = refusal(f"{web}/toftp")
    assert "Expected a public HTTP(S) URL without credentials (media urls and their redirects must be" in str(error)
    assert "Download failed with HTTP 404" in str(refusal(f"{web}/missing"))
    monkeypatch.setenv("XINFERENCE_MEDIA_FETCH_TIMEOUT", "0.3")
    error = refusal(f"{web}/slow")
    assert isinstance(error, Ovis2LimitError)
    assert "Media fetch exceeded its time budget (setting: XINFERENCE_MEDIA_FETCH_TIMEOUT)" in str(error)


def test_https_never_redirects_to_http(tmp_path, monkeypatch):
    """A TLS server on the loopback with its own certificate, trusted through SSL_CERT_FILE."""
    pytest.importorskip("cryptography")
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:9/a.png")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS", "false")
    try:
        error = refusal(f"https://127.0.0.1:{server.server_address[1]}/a.png")
    finally:
        server.shutdown()
    assert "HTTPS downloads cannot redirect to HTTP (fixed by Xinference)" in str(error)


def test_local_files_are_read_only_when_regular_and_bounded(tmp_path, monkeypatch):
    """Xinference reads an allowed local path whole: /dev/zero would fill the memory, a FIFO block for ever."""
    monkeypatch.setenv("XINFERENCE_MEDIA_ALLOW_LOCAL_PATH", "true")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo), f"file://{fifo}"):
        assert "is not a regular file" in str(refusal(path))
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 3000)
    monkeypatch.setenv("XINFERENCE_MEDIA_MAX_BYTES", "1000")
    error = refusal(str(big))
    assert isinstance(error, Ovis2LimitError) and "over XINFERENCE_MEDIA_MAX_BYTES=1000" in str(error)
    monkeypatch.delenv("XINFERENCE_MEDIA_ALLOW_LOCAL_PATH")
    monkeypatch.setenv("OVIS2_XINF_MEDIA_LOCAL_DIR", str(tmp_path))
    for path in ("/dev/zero", str(fifo), str(big)):
        assert "messages[0].content[1]: " in str(refusal(path))


# --- text that is not valid Unicode ---------------------------------------------------------

LONE = json.loads('"a\\ud800b"')  # what Python's json parser makes of a raw JSON string "a\ud800b"


@pytest.mark.parametrize("message,where", [
    ({"role": "user", "content": LONE}, "messages[0].content: the text is not valid Unicode"),
    ({"role": "user", "content": [text("ok"), text(LONE)]}, "messages[0].content[1]: the text is not valid Unicode"),
    ({"role": "user", "content": [{"type": "input_text", "text": LONE}]}, "messages[0].content[0]: the text"),
    ({"role": "user", "content": [text("x"), image("https://example.com/" + LONE)]},
     "messages[0].content[1]: the image_url url is not valid Unicode"),
    ({"role": "user", "content": [{"type": "video_url", "video_url": "data:video/mp4;base64," + LONE}]},
     "messages[0].content[0]: the video_url url is not valid Unicode"),
])
def test_lone_surrogates_are_refused_naming_the_part(message, where):
    assert LONE == "a\ud800b"
    with pytest.raises(Ovis2RequestError) as info:
        parse_messages([message])
    assert str(info.value).startswith(where)
    assert "lone surrogate U+D800 at character " in str(info.value)


def test_lone_surrogates_in_roles_types_and_earlier_turns():
    for message, needle in [
        ({"role": "us\udfffer", "content": "x"}, "messages[0].role: 'us\\udfffer' is not supported"),
        ({"role": "user", "content": [{"type": "te\ud800xt", "text": "x"}]},
         "messages[0].content[0]: unsupported content type 'te\\ud800xt'"),
        ({"role": "user", "content": [{"type": ["text"], "text": "x"}]}, "unsupported content type ['text']"),
        ({"role": ["user"], "content": "x"}, "messages[0].role: ['user'] is not supported"),
        ({"role": {"a": 1}, "content": "x"}, "messages[0].role: {'a': 1} is not supported"),
        ({"role": "x" * 10_000, "content": "x"}, "messages[0].role: 'xxxxxxxxx"),
    ]:
        with pytest.raises(Ovis2RequestError) as info:
            build_conversation([message], LIMITS)
        assert needle in str(info.value)
        str(info.value).encode("utf-8")  # the message itself can be sent
        assert len(str(info.value)) < 200
    with pytest.raises(Ovis2RequestError, match=r"messages\[1\]\.content: the text is not valid Unicode"):
        build_conversation([{"role": "system", "content": "ok"}, {"role": "assistant", "content": "\udc80"},
                            {"role": "user", "content": "x"}], LIMITS)
    with pytest.raises(Ovis2RequestError, match=r"messages\[0\]\.content\[1\]: text may not contain the reserved"):
        parse_messages([{"role": "user", "content": [text("a"), text("b <image>")]}])
