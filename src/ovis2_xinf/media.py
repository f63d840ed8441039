"""Fetching and decoding the images and videos of a chat request, within limits.

Fetching goes through Xinference's own media layer (``xinference.model.llm.media``):
it decides which URL schemes are allowed (``http``, ``https``, ``data:``; local paths
only with ``XINFERENCE_MEDIA_ALLOW_LOCAL_PATH``), refuses private addresses, pins DNS,
and bounds size and time (``XINFERENCE_MEDIA_*``), so Ovis2 follows the same policy as
every other Xinference model. On top of it this module bounds what the bytes may
decode to: pixels per image and per request, progressive JPEG scans, and the frames a
request's videos may hold, since decoding runs on the model process's pool threads and
a few hostile bytes can otherwise cost minutes of CPU or gigabytes of memory there.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Type
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .errors import Ovis2LimitError, Ovis2RequestError
from .settings import env_int

ENV_MAX_IMAGE_PIXELS = "OVIS2_XINF_MAX_IMAGE_PIXELS"
ENV_MAX_IMAGES = "OVIS2_XINF_MAX_IMAGES"
ENV_VIDEO_FRAMES = "OVIS2_XINF_VIDEO_FRAMES"
ENV_MAX_VIDEO_FRAMES = "OVIS2_XINF_MAX_VIDEO_FRAMES"
ENV_MAX_REQUEST_PIXELS = "OVIS2_XINF_MAX_REQUEST_PIXELS"
ENV_MAX_VIDEO_SOURCE_FRAMES = "OVIS2_XINF_MAX_VIDEO_SOURCE_FRAMES"
ENV_MAX_JPEG_SCANS = "OVIS2_XINF_MAX_JPEG_SCANS"
ENV_LOCAL_DIR = "OVIS2_XINF_MEDIA_LOCAL_DIR"
# Xinference 4.1's refusals (xinference/model/llm/media.py, xinference/model/image/utils.py),
# matched by a piece of their message, with the error class and what the client can change.
_XINFERENCE_REFUSALS: Tuple[Tuple[str, Type[Ovis2RequestError], str], ...] = (
    ("Media exceeds", Ovis2LimitError, "setting: XINFERENCE_MEDIA_MAX_BYTES"),
    ("exceeded its time budget", Ovis2LimitError, "setting: XINFERENCE_MEDIA_FETCH_TIMEOUT"),
    ("Local file media urls are rejected", Ovis2LimitError, f"setting: {ENV_LOCAL_DIR}"),
    ("must resolve only to public addresses", Ovis2LimitError, "setting: XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS"),
    ("Too many redirects", Ovis2LimitError, "at most 5 redirects are followed, fixed by Xinference"),
    ("HTTPS downloads cannot redirect to HTTP", Ovis2RequestError, "fixed by Xinference"),
    ("Unsupported media url scheme", Ovis2RequestError,
     f"media urls may be http, https or data:; local paths need {ENV_LOCAL_DIR}"),
    ("Expected a public HTTP(S) URL without credentials", Ovis2RequestError,
     "media urls and their redirects must be http(s), name a host and carry no user:password"),
)
# Pillow formats never decoded for a client: EPS runs Ghostscript, a PostScript interpreter
# with no time limit, on the client's program.
_REFUSED_IMAGE_FORMATS = ("EPS",)
# A video frame costs at least as much as one of this size to demux and decode; larger ones
# cost in proportion to their pixels, so the source frame limit is counted in these.
REFERENCE_FRAME = (1920, 1080)
_REFERENCE_PIXELS = REFERENCE_FRAME[0] * REFERENCE_FRAME[1]
# FFmpeg may open other resources named inside the bytes (an ffconcat script reads files
# from the working directory, playlists fetch URLs); no protocol is allowed for that.
_VIDEO_OPEN_OPTIONS = {"protocol_whitelist": "none"}


@dataclass(frozen=True)
class MediaLimits:
    """What one request's media may cost; each field has an ``OVIS2_XINF_*`` setting."""

    max_image_pixels: int = 50_000_000
    max_images: int = 16
    video_frames: int = 12
    max_video_frames: int = 64
    # 16 photos of 12.5 MP (4080x3060, a phone's 12 MP camera): 600 MB as RGB.
    max_request_pixels: int = 200_000_000
    # Two minutes at 30 fps of frames up to 1920x1080, summed over a request's videos.
    max_video_source_frames: int = 3600
    # Progressive JPEGs have about 10 scans; each scan is a pass over the whole image.
    max_jpeg_scans: int = 100

    @classmethod
    def from_env(cls) -> "MediaLimits":
        defaults = cls()
        return cls(
            max_image_pixels=env_int(ENV_MAX_IMAGE_PIXELS, defaults.max_image_pixels),
            max_images=env_int(ENV_MAX_IMAGES, defaults.max_images),
            video_frames=env_int(ENV_VIDEO_FRAMES, defaults.video_frames),
            max_video_frames=env_int(ENV_MAX_VIDEO_FRAMES, defaults.max_video_frames),
            max_request_pixels=env_int(ENV_MAX_REQUEST_PIXELS, defaults.max_request_pixels),
            max_video_source_frames=env_int(ENV_MAX_VIDEO_SOURCE_FRAMES, defaults.max_video_source_frames),
            max_jpeg_scans=env_int(ENV_MAX_JPEG_SCANS, defaults.max_jpeg_scans),
        )


class MediaBudget:
    """What is left of one request's decoding limits, charged as its media are decoded.

    The limits are per request, not per item: a request of many small items costs the
    model process's threads as much as one large one.
    """

    def __init__(self, limits: MediaLimits) -> None:
        self.limits = limits
        self.pixels_used = 0
        self.video_pixels_used = 0  # source frames, each counted as at least a 1920x1080 one

    def take_pixels(self, width: int, height: int, count: int, where: str) -> None:
        """Charge ``count`` decoded images of ``width`` x ``height``, or refuse before decoding them."""
        pixels = width * height * count
        if self.pixels_used + pixels > self.limits.max_request_pixels:
            frames = f"{count} frames of " if count > 1 else ""
            earlier = f", after {self.pixels_used} in earlier media" if self.pixels_used else ""
            raise Ovis2LimitError(
                f"{where}: {frames}{width}x{height} would bring the request to {self.pixels_used + pixels} "
                f"pixels{earlier}, over the limit of {self.limits.max_request_pixels} pixels per request "
                f"({ENV_MAX_REQUEST_PIXELS})"
            )
        self.pixels_used += pixels

    def video_frames_left(self, width: int, height: int) -> int:
        """How many more source frames of this size the request's videos may hold."""
        left = self.limits.max_video_source_frames * _REFERENCE_PIXELS - self.video_pixels_used
        return max(left, 0) // _frame_cost(width, height)

    def take_video_frames(self, count: int, width: int, height: int) -> bool:
        """Charge ``count`` source frames of this size; False once the request is over its limit."""
        self.video_pixels_used += count * _frame_cost(width, height)
        return self.video_pixels_used <= self.limits.max_video_source_frames * _REFERENCE_PIXELS

    def video_limit_error(self, where: str, detail: str, width: int, height: int) -> Ovis2LimitError:
        """The refusal of a video over the source frame limit, saying how its frames were counted."""
        weight = _frame_cost(width, height) / _REFERENCE_PIXELS
        counted = (
            f"; its {width}x{height} frames count {weight:.1f} times each, being larger than "
            f"{REFERENCE_FRAME[0]}x{REFERENCE_FRAME[1]}" if weight > 1 else ""
        )
        used = self.video_pixels_used // _REFERENCE_PIXELS
        earlier = f" ({used} already counted)" if used else ""
        return Ovis2LimitError(
            f"{where}: {detail}, over the limit of {self.limits.max_video_source_frames} source frames per "
            f"request{earlier} ({ENV_MAX_VIDEO_SOURCE_FRAMES}){counted}"
        )


def _frame_cost(width: int, height: int) -> int:
    return max(width * height, _REFERENCE_PIXELS)


def describe_url(url: str, limit: int = 60) -> str:
    """A short form of a URL for messages (data URLs can be megabytes long)."""
    if url.startswith("data:"):
        return url[: url.find(",") + 1] + "..." if "," in url else url[:limit]
    return url if len(url) <= limit else url[: limit - 3] + "..."


def _allowed_local_file(url: str) -> Optional[Path]:
    """A local path inside the directory ``OVIS2_XINF_MEDIA_LOCAL_DIR`` allows, if any."""
    root = os.environ.get(ENV_LOCAL_DIR, "").strip()
    if not root:
        return None
    try:  # NUL bytes, unencodable characters and malformed URLs are simply not allowed paths
        scheme = urlparse(url).scheme.lower()
        if scheme not in ("", "file"):
            return None
        path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
        resolved, base = path.resolve(strict=True), Path(root).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    return resolved if resolved.is_file() and resolved.is_relative_to(base) else None


def _max_bytes() -> int:
    from xinference.model.llm.media import _max_bytes as xinference_max_bytes

    return xinference_max_bytes()


def _read_local_file(path: str, where: str) -> bytes:
    """A regular file's bytes, at most ``XINFERENCE_MEDIA_MAX_BYTES`` of them.

    Xinference reads an allowed local path whole, so ``/dev/zero`` would fill the memory
    and a FIFO would block the thread for ever; only regular files of bounded size are read.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise Ovis2RequestError(f"{where}: {path} is not a regular file")
    limit = _max_bytes()
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise Ovis2LimitError(f"{where}: {path} is over XINFERENCE_MEDIA_MAX_BYTES={limit} bytes")
    return data


def _refusal(exc: ValueError, url: str, where: str) -> Ovis2RequestError:
    """Xinference's refusal as the client's error, naming what to change where anything can be."""
    message = str(exc)
    for needle, error, hint in _XINFERENCE_REFUSALS:
        if needle in message:
            return error(f"{where}: {describe_url(url)}: {message} ({hint})")
    return Ovis2RequestError(f"{where}: {describe_url(url)}: {message}")


def read_media(url: str, where: str) -> bytes:
    """The bytes behind a media URL, or an error naming the part, URL and limit."""
    from xinference.model.llm.media import decode_data_uri, fetch_media, local_path, validate_media_url

    if not isinstance(url, str) or not url.strip():
        raise Ovis2RequestError(f"{where}: the media url must be a non-empty string")
    local = _allowed_local_file(url)
    try:
        if local is not None:
            data = _read_local_file(str(local), where)
        elif url[:5].lower() == "data:":
            # Xinference's validation of a data: URL decodes it, and its loader decodes it
            # again; the same parser called once halves the base64 work (3.5 ms per MB here).
            data = decode_data_uri(url)
        elif validate_media_url(url) == "file":  # the scheme policy and the address check, before connecting
            data = _read_local_file(local_path(url), where)
        else:
            data = fetch_media(url)
    except Ovis2RequestError:
        raise
    except ValueError as exc:
        raise _refusal(exc, url, where) from None
    except Exception as exc:  # socket, urllib3, TLS and file errors all mean "could not fetch"
        reason = str(exc).removeprefix("None: ") or type(exc).__name__
        raise Ovis2RequestError(f"{where}: cannot fetch {describe_url(url)}: {reason}") from None
    if len(data) > _max_bytes():  # data: URLs are decoded without Xinference's download cap
        raise Ovis2LimitError(
            f"{where}: {describe_url(url)}: {len(data)} bytes, over XINFERENCE_MEDIA_MAX_BYTES={_max_bytes()}"
        )
    return data


def _check_pixels(width: int, height: int, where: str, limits: MediaLimits) -> None:
    if width * height > limits.max_image_pixels:
        raise Ovis2LimitError(
            f"{where}: {width}x{height} is {width * height} pixels, over the limit of "
            f"{limits.max_image_pixels} ({ENV_MAX_IMAGE_PIXELS})"
        )
    if width < 1 or height < 1:
        raise Ovis2RequestError(f"{where}: image has no pixels ({width}x{height})")


def _check_jpeg_scans(data: bytes, where: str, limits: MediaLimits) -> None:
    """Refuse a JPEG with too many scans before decoding it.

    libjpeg passes over every block of the image once per scan, and a scan can be a few
    dozen bytes, so a progressive JPEG of ordinary size can hold a million of them. Each
    start-of-scan marker is counted (0xFF 0xDA cannot occur inside entropy-coded data;
    markers inside metadata, such as an EXIF thumbnail's, only make the count larger).
    """
    scans = data.count(b"\xff\xda")
    if scans > limits.max_jpeg_scans:
        raise Ovis2LimitError(
            f"{where}: the JPEG has {scans} scans, over the limit of {limits.max_jpeg_scans} ({ENV_MAX_JPEG_SCANS})"
        )


def _image_formats() -> List[str]:
    Image.init()
    return [name for name in Image.ID if name not in _REFUSED_IMAGE_FORMATS]


def decode_image(data: bytes, where: str, limits: MediaLimits, budget: Optional[MediaBudget] = None) -> Image.Image:
    """Decode image bytes, checking the pixel count from the header before decoding.

    ``budget`` carries the request's pixel limit across its images. Only the first frame of
    an animated GIF, PNG or WebP is decoded (``load`` decodes the current frame).
    """
    budget = MediaBudget(limits) if budget is None else budget
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_image_formats())
            _check_pixels(image.width, image.height, where, limits)
            if image.format in ("JPEG", "MPO"):
                _check_jpeg_scans(data, where, limits)
            budget.take_pixels(image.width, image.height, 1, where)
            image.load()
    except Ovis2RequestError:
        raise
    except UnidentifiedImageError:
        raise Ovis2RequestError(f"{where}: not a decodable image (unknown or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Ovis2LimitError(
            f"{where}: refused as a decompression bomb ({exc}); the limit here is "
            f"{limits.max_image_pixels} pixels ({ENV_MAX_IMAGE_PIXELS})"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise Ovis2RequestError(f"{where}: the image data is corrupt ({exc})") from None
    return image


def _sample_indices(total: int, count: int) -> List[int]:
    if total <= count:
        return list(range(total))
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]


def _count_frames(container, stream, where: str, budget: MediaBudget) -> int:
    """The video's frames (packets with data), charged to the request's source frame limit.

    The container's own count, where it has one (MP4 does, Matroska does not), refuses a long
    video before any demuxing; the demuxing stops at the limit either way.
    """
    width, height = stream.codec_context.width, stream.codec_context.height
    allowed = budget.video_frames_left(width, height)
    if stream.frames > allowed:
        raise budget.video_limit_error(where, f"the video declares {stream.frames} frames", width, height)
    total = 0
    for packet in container.demux(stream):
        if packet.size:
            total += 1
            if total > allowed:
                raise budget.video_limit_error(where, f"the video has more than {allowed} frames", width, height)
    budget.take_video_frames(total, width, height)
    return total


def _video_stream(container, where: str):
    """The first video stream, with every other stream skipped by the demuxer rather than
    handed to Python packet by packet (tiny audio packets would otherwise cost microseconds each)."""
    from av.stream import Discard

    if not container.streams.video:
        raise Ovis2RequestError(f"{where}: the file has no video stream")
    stream = container.streams.video[0]
    for other in container.streams:
        if other.index != stream.index:
            other.discard = Discard.all
    return stream


def decode_video(
    data: bytes, where: str, limits: MediaLimits, frames: int, budget: Optional[MediaBudget] = None
) -> List[Image.Image]:
    """Decode ``frames`` frames spread evenly over the whole video.

    The sampled frames need every frame before them decoded, so the cost is the video's
    length: ``budget`` bounds the source frames of the request's videos (frames above
    1920x1080 counting in proportion to their size) and the pixels of the frames kept.
    """
    import av

    budget = MediaBudget(limits) if budget is None else budget
    try:
        with av.open(io.BytesIO(data), mode="r", options=_VIDEO_OPEN_OPTIONS) as container:
            stream = _video_stream(container, where)
            width, height = stream.codec_context.width, stream.codec_context.height
            _check_pixels(width, height, where, limits)
            total = _count_frames(container, stream, where, budget)
        if total == 0:
            raise Ovis2RequestError(f"{where}: the video has no frames")
        wanted = set(_sample_indices(total, frames))
        last = max(wanted)
        budget.take_pixels(width, height, len(wanted), where)
        images = []
        # Opened again rather than seeking back: raw streams (an .h264 file) cannot seek.
        with av.open(io.BytesIO(data), mode="r", options=_VIDEO_OPEN_OPTIONS) as container:
            for index, frame in enumerate(container.decode(_video_stream(container, where))):
                if frame.width * frame.height > width * height:  # the size grew mid-stream: charged again
                    if not budget.take_video_frames(1, frame.width, frame.height):
                        detail = "its frames grow while decoding"
                        raise budget.video_limit_error(where, detail, frame.width, frame.height)
                    if index in wanted:
                        _check_pixels(frame.width, frame.height, where, limits)
                        budget.take_pixels(frame.width, frame.height, 1, where)
                if index in wanted:
                    images.append(frame.to_image())
                if index >= last:
                    break
    except Ovis2RequestError:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise Ovis2RequestError(f"{where}: not a decodable video ({exc})") from None
    if not images:
        raise Ovis2RequestError(f"{where}: no frame of the video could be decoded")
    return images
