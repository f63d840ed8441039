"""What a request's media may cost to decode: pixels per request, source video frames,
JPEG scans, animation frames, and formats that would reach outside the bytes (no model needed)."""

from __future__ import annotations

import base64
import io
from typing import List

import av
import numpy as np
import pytest
from PIL import Image

from ovis2_xinf.errors import Ovis2LimitError, Ovis2RequestError
from ovis2_xinf.media import MediaBudget, MediaLimits, decode_image, decode_video
from ovis2_xinf.messages import build_conversation


def video(frames: int, size=(64, 48), codec: str = "ffv1", container: str = "matroska", rate: int = 10) -> bytes:
    """A clip whose frame i has the gray level 7 * i, so each decoded frame says its index."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "bf": "2", "g": "8"}  # B-frames and several keyframes
        for index in range(frames):
            pixels = np.full((size[1], size[0], 3), 7 * index % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def levels(images: List[Image.Image]) -> List[int]:
    return [round(np.asarray(image.convert("L")).mean() / 7) for image in images]


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def video_part(data: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(data, "video/x-matroska")}}


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


def png(size=(100, 100), color=(10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_limits_from_env(monkeypatch):
    assert MediaLimits().max_request_pixels == 200_000_000 and MediaLimits().max_video_source_frames == 3600
    monkeypatch.setenv("OVIS2_XINF_MAX_REQUEST_PIXELS", "1000")
    monkeypatch.setenv("OVIS2_XINF_MAX_VIDEO_SOURCE_FRAMES", "30")
    monkeypatch.setenv("OVIS2_XINF_MAX_JPEG_SCANS", "5")
    limits = MediaLimits.from_env()
    assert (limits.max_request_pixels, limits.max_video_source_frames, limits.max_jpeg_scans) == (1000, 30, 5)
    monkeypatch.setenv("OVIS2_XINF_MAX_VIDEO_SOURCE_FRAMES", "0")
    with pytest.raises(ValueError, match="OVIS2_XINF_MAX_VIDEO_SOURCE_FRAMES='0' must be at least 1"):
        MediaLimits.from_env()


# --- video: the frames a request's videos hold bound the decoding work ---------------------


@pytest.mark.parametrize("codec,container", [("ffv1", "matroska"), ("libx264", "mp4"), ("libx264", "matroska")])
def test_sampled_frames_are_the_evenly_spaced_ones(codec, container):
    """The frames chosen are those of the evenly spaced indices over the whole clip, B-frames or not."""
    data = video(30, codec=codec, container=container)
    assert levels(decode_video(data, "v", MediaLimits(), 12)) == [0, 3, 5, 8, 11, 13, 16, 18, 21, 24, 26, 29]
    assert levels(decode_video(data, "v", MediaLimits(), 1)) == [0]
    assert levels(decode_video(video(5, codec=codec, container=container), "v", MediaLimits(), 12)) == [0, 1, 2, 3, 4]


def test_long_videos_are_refused_from_the_container_count_before_demuxing():
    data = video(40, codec="libx264", container="mp4")  # MP4 records its frame count
    with pytest.raises(Ovis2LimitError) as info:
        decode_video(data, "messages[0].content[0]", MediaLimits(max_video_source_frames=30), 4)
    assert str(info.value) == (
        "messages[0].content[0]: the video declares 40 frames, over the limit of 30 source frames per request "
        "(OVIS2_XINF_MAX_VIDEO_SOURCE_FRAMES)")


def test_long_videos_are_refused_while_demuxing_when_the_container_has_no_count():
    data = video(40)  # Matroska does not record one
    with pytest.raises(Ovis2LimitError, match=r"v: the video has more than 30 frames, over the limit of 30 source "
                                              r"frames per request \(OVIS2_XINF_MAX_VIDEO_SOURCE_FRAMES\)$"):
        decode_video(data, "v", MediaLimits(max_video_source_frames=30), 4)
    assert len(decode_video(video(30), "v", MediaLimits(max_video_source_frames=30), 4)) == 4


def test_frames_larger_than_1080p_count_in_proportion():
    data = video(3, size=(2880, 1440))  # twice 1920x1080
    with pytest.raises(Ovis2LimitError) as info:
        decode_video(data, "v", MediaLimits(max_video_source_frames=5), 2)
    assert "the video has more than 2 frames, over the limit of 5 source frames" in str(info.value)
    assert str(info.value).endswith("its 2880x1440 frames count 2.0 times each, being larger than 1920x1080")
    assert len(decode_video(data, "v", MediaLimits(max_video_source_frames=6), 2)) == 2


def test_frames_that_grow_mid_stream_are_counted_at_their_size():
    """A raw H.264 stream may change its size at any keyframe; the container header gives the first."""
    small, large = (video(3, size=size, codec="libx264", container="h264") for size in ((64, 48), (2880, 1440)))
    decoded = decode_video(small + large, "v", MediaLimits(), 6)
    assert [image.size for image in decoded] == [(64, 48)] * 3 + [(2880, 1440)] * 3
    with pytest.raises(Ovis2LimitError, match=r"v: its frames grow while decoding, over the limit of 8 source frames "
                                              r"per request .*its 2880x1440 frames count 2\.0 times each"):
        decode_video(small + large, "v", MediaLimits(max_video_source_frames=8), 6)


def test_the_source_frame_limit_is_per_request():
    clip = video(20)
    limits = MediaLimits(max_video_source_frames=30, video_frames=2)
    with pytest.raises(Ovis2LimitError) as info:
        build_conversation([{"role": "user", "content": [video_part(clip), video_part(clip)]}], limits)
    assert str(info.value) == ("messages[0].content[1]: the video has more than 10 frames, over the limit of 30 source "
                               "frames per request (20 already counted) (OVIS2_XINF_MAX_VIDEO_SOURCE_FRAMES)")
    assert len(build_conversation([{"role": "user", "content": [video_part(clip)]}], limits).images) == 2


def test_videos_may_not_open_other_files(tmp_path, monkeypatch):
    """An ffconcat script is a "video" FFmpeg would assemble from files in the working directory."""
    (tmp_path / "clip.mkv").write_bytes(video(3))
    monkeypatch.chdir(tmp_path)
    script = b"ffconcat version 1.0\nfile clip.mkv\n"
    with av.open(io.BytesIO(script)) as container:  # what FFmpeg does when nothing stops it
        assert container.format.name == "concat" and sum(1 for _ in container.decode(video=0)) == 3
    with pytest.raises(Ovis2RequestError, match="v: not a decodable video"):
        decode_video(script, "v", MediaLimits(), 2)


def test_other_streams_are_skipped():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as output:
        picture = output.add_stream("ffv1", rate=4)
        picture.width, picture.height, picture.pix_fmt = 32, 24, "bgr0"
        sound = output.add_stream("pcm_u8", rate=8000, layout="mono")
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 7 * index, np.uint8), format="rgb24")
            for packet in picture.encode(frame):
                output.mux(packet)
        for index in range(2000):  # tiny audio packets, many more than video frames
            samples = av.AudioFrame.from_ndarray(np.full((1, 1), 128, np.uint8), format="u8", layout="mono")
            samples.sample_rate, samples.pts = 8000, index
            for packet in sound.encode(samples):
                output.mux(packet)
        for stream in (picture, sound):
            for packet in stream.encode():
                output.mux(packet)
    assert levels(decode_video(buffer.getvalue(), "v", MediaLimits(max_video_source_frames=3), 3)) == [0, 1, 2]


# --- images: pixels per request, checked from each header before decoding -----------------


def test_request_pixels_are_summed_over_images_before_decoding():
    limits = MediaLimits(max_request_pixels=25_000)
    corrupt = png()[:60]  # a valid header over truncated data: refused by the budget, not found corrupt
    with pytest.raises(Ovis2LimitError) as info:
        build_conversation([{"role": "user", "content": [image_part(png()), image_part(png()), image_part(corrupt)]}],
                           limits)
    assert str(info.value) == (
        "messages[0].content[2]: 100x100 would bring the request to 30000 pixels, after 20000 in earlier media, "
        "over the limit of 25000 pixels per request (OVIS2_XINF_MAX_REQUEST_PIXELS)")
    assert len(build_conversation([{"role": "user", "content": [image_part(png()), image_part(png())]}],
                                  limits).images) == 2


def test_video_frames_count_towards_request_pixels():
    limits = MediaLimits(max_request_pixels=64 * 48 * 4 + 100 * 100 - 1, video_frames=4)
    with pytest.raises(Ovis2LimitError, match=r"messages\[0\]\.content\[1\]: 100x100 would bring the request to "
                                              r"22288 pixels, after 12288 in earlier media"):
        build_conversation([{"role": "user", "content": [video_part(video(8)), image_part(png())]}], limits)
    budget = MediaBudget(MediaLimits(max_request_pixels=64 * 48 * 3))
    with pytest.raises(Ovis2LimitError, match=r"v: 4 frames of 64x48 would bring the request to 12288 pixels"):
        decode_video(video(8), "v", budget.limits, 4, budget)


def test_twelve_megapixel_photos_fit_the_default():
    assert 16 * 4080 * 3060 <= MediaLimits().max_request_pixels


# --- other costs hidden in image files ----------------------------------------------------


def _progressive_jpeg_with_extra_scans(extra: int) -> bytes:
    """A progressive JPEG with one of its scans repeated: libjpeg passes over the image once more per scan."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    scans = [data[start:end] for start, end in zip(starts, starts[1:] + [len(data) - 2])]
    return data[:-2] + min(scans, key=len) * extra + data[-2:]


def test_jpegs_with_too_many_scans_are_refused_before_decoding():
    assert decode_image(_progressive_jpeg_with_extra_scans(0), "i", MediaLimits()).size == (64, 64)
    assert decode_image(_progressive_jpeg_with_extra_scans(50), "i", MediaLimits()).size == (64, 64)
    with pytest.raises(Ovis2LimitError, match=r"i: the JPEG has 1010 scans, over the limit of 100 "
                                              r"\(OVIS2_XINF_MAX_JPEG_SCANS\)"):
        decode_image(_progressive_jpeg_with_extra_scans(1000), "i", MediaLimits())


@pytest.mark.parametrize("format", ["GIF", "PNG", "WEBP"])
def test_animations_decode_only_their_first_frame(format):
    frames = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(6)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=format, save_all=True, append_images=frames[1:], lossless=True)
    data = buffer.getvalue()
    image = decode_image(data, "i", MediaLimits())
    assert image.tell() == 0 and image.convert("RGB").getpixel((5, 5)) == (0, 0, 0)
    if format != "WEBP":  # libwebp checks the whole container when it opens it
        truncated = decode_image(data[: len(data) * 2 // 3], "i", MediaLimits())  # later frames never read
        assert truncated.convert("RGB").getpixel((5, 5)) == (0, 0, 0)


def test_postscript_is_not_run():
    """Pillow decodes EPS by running Ghostscript on the client's PostScript, with no time limit."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{} loop\n%%EOF\n"
    with pytest.raises(Ovis2RequestError, match="i: not a decodable image"):
        decode_image(eps, "i", MediaLimits())
