"""Fetching and decoding the images and videos of a chat request, within limits.

Fetching goes through Xinference's own media layer (``xinference.model.llm.media``):
it decides which URL schemes are allowed (``http``, ``https``, ``data:``; local paths
only with ``XINFERENCE_MEDIA_ALLOW_LOCAL_PATH``), refuses private addresses, pins DNS,
and bounds size and time (``XINFERENCE_MEDIA_*``), so Ovis2 follows the same policy as
every other Xinference model. On top of it this module bounds what the bytes may
decode to: pixels per image and frames per video.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .errors import Ovis2LimitError, Ovis2RequestError

ENV_MAX_IMAGE_PIXELS = "OVIS2_XINF_MAX_IMAGE_PIXELS"
ENV_MAX_IMAGES = "OVIS2_XINF_MAX_IMAGES"
ENV_VIDEO_FRAMES = "OVIS2_XINF_VIDEO_FRAMES"
ENV_MAX_VIDEO_FRAMES = "OVIS2_XINF_MAX_VIDEO_FRAMES"
ENV_LOCAL_DIR = "OVIS2_XINF_MEDIA_LOCAL_DIR"
# Xinference's media errors, and the setting behind each, so the client learns what to change.
_XINFERENCE_LIMITS = (
    ("Media exceeds", "setting: XINFERENCE_MEDIA_MAX_BYTES"),
    ("time budget", "setting: XINFERENCE_MEDIA_FETCH_TIMEOUT"),
    ("Local file media urls are rejected", f"setting: {ENV_LOCAL_DIR}"),
    ("private", "setting: XINFERENCE_MEDIA_BLOCK_PRIVATE_ADDRESS"),
    ("Too many redirects", "at most 5 redirects are followed, fixed by Xinference"),
)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be at least 1")
    return value


@dataclass(frozen=True)
class MediaLimits:
    max_image_pixels: int = 50_000_000
    max_images: int = 16
    video_frames: int = 12
    max_video_frames: int = 64

    @classmethod
    def from_env(cls) -> "MediaLimits":
        defaults = cls()
        return cls(
            max_image_pixels=_env_int(ENV_MAX_IMAGE_PIXELS, defaults.max_image_pixels),
            max_images=_env_int(ENV_MAX_IMAGES, defaults.max_images),
            video_frames=_env_int(ENV_VIDEO_FRAMES, defaults.video_frames),
            max_video_frames=_env_int(ENV_MAX_VIDEO_FRAMES, defaults.max_video_frames),
        )


def describe_url(url: str, limit: int = 60) -> str:
    """A short form of a URL for messages (data URLs can be megabytes long)."""
    if url.startswith("data:"):
        return url[: url.find(",") + 1] + "..." if "," in url else url[:limit]
    return url if len(url) <= limit else url[: limit - 3] + "..."


def _allowed_local_file(url: str) -> Optional[Path]:
    """A local path inside the directory ``OVIS2_XINF_MEDIA_LOCAL_DIR`` allows, if any."""
    root = os.environ.get(ENV_LOCAL_DIR, "").strip()
    scheme = urlparse(url).scheme.lower()
    if not root or scheme not in ("", "file"):
        return None
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    try:
        resolved, base = path.resolve(strict=True), Path(root).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return resolved if resolved.is_file() and resolved.is_relative_to(base) else None


def _max_bytes() -> int:
    from xinference.model.llm.media import _max_bytes as xinference_max_bytes

    return xinference_max_bytes()


def read_media(url: str, where: str) -> bytes:
    """The bytes behind a media URL, or an error naming the part, URL and limit."""
    from xinference.model.llm.media import decode_data_uri, load_media_bytes

    if not isinstance(url, str) or not url.strip():
        raise Ovis2RequestError(f"{where}: the media url must be a non-empty string")
    local = _allowed_local_file(url)
    if local is not None:
        size = local.stat().st_size
        if size > _max_bytes():
            raise Ovis2LimitError(f"{where}: {local} is {size} bytes, over XINFERENCE_MEDIA_MAX_BYTES={_max_bytes()}")
        return local.read_bytes()
    try:
        # load_media_bytes validates a data: URL by decoding it, then decodes it again;
        # the same parser called once halves the base64 work (3.5 ms per MB here).
        data = decode_data_uri(url) if url[:5].lower() == "data:" else load_media_bytes(url)
    except ValueError as exc:
        message = str(exc)
        limit = next((hint for needle, hint in _XINFERENCE_LIMITS if needle in message), None)
        if limit:
            raise Ovis2LimitError(f"{where}: {describe_url(url)}: {message} ({limit})") from None
        raise Ovis2RequestError(f"{where}: {describe_url(url)}: {message}") from None
    except Exception as exc:  # socket, urllib3 and TLS errors all mean "could not fetch"
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


def decode_image(data: bytes, where: str, limits: MediaLimits) -> Image.Image:
    """Decode image bytes, checking the pixel count from the header before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.width, image.height, where, limits)
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


def decode_video(data: bytes, where: str, limits: MediaLimits, frames: int) -> List[Image.Image]:
    """Decode ``frames`` frames spread evenly over the whole video."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise Ovis2RequestError(f"{where}: the file has no video stream")
            stream = container.streams.video[0]
            _check_pixels(stream.codec_context.width, stream.codec_context.height, where, limits)
            total = sum(1 for packet in container.demux(stream) if packet.size)
            if total == 0:
                raise Ovis2RequestError(f"{where}: the video has no frames")
            wanted = set(_sample_indices(total, frames))
            container.seek(0)
            images = []
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    images.append(frame.to_image())
                if len(images) == len(wanted):
                    break
    except Ovis2RequestError:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise Ovis2RequestError(f"{where}: not a decodable video ({exc})") from None
    if not images:
        raise Ovis2RequestError(f"{where}: no frame of the video could be decoded")
    return images
