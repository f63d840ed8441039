"""OpenAI chat messages to the Ovis2 conversation.

Rules (also in docs/architecture.md):

* roles ``system`` / ``user`` / ``assistant`` become Ovis turns; with no system message
  the default system prompt "You are a helpful assistant." is used;
* images stay in the turn where they were sent, in the order of the content parts;
  text parts and media parts are joined with newlines in that order;
* a request with exactly one image writes it as ``<image>``; a turn with several images
  labels them ``Image 1: <image>``, ``Image 2: <image>``, ...; a video becomes one
  ``<image>`` line per sampled frame;
* ``max_partition`` (crops per image): 9 for a single image, 4 with several images,
  1 when a video is present; a request's or launch's ``max_partition`` overrides it.

Everything is validated before any media is fetched, so malformed requests fail fast
with the message and part index that are wrong. Clients are not trusted: any JSON value
may stand where a string is expected, and JSON strings may hold lone surrogates
(``"\ud800"``), which Python's parser accepts but no UTF-8 encoder (the tokenizer's) does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from PIL import Image

from .errors import Ovis2LimitError, Ovis2RequestError
from .media import (
    ENV_MAX_IMAGES,
    ENV_MAX_VIDEO_FRAMES,
    MediaBudget,
    MediaLimits,
    decode_image,
    decode_video,
    read_media,
)
from .prompt import IMAGE_MARKER, Turn

ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
TEXT_TYPES = ("text", "input_text")
MEDIA_TYPES = {"image_url": "image", "image": "image", "video_url": "video", "video": "video"}
SINGLE_IMAGE_PARTITION = 9
MULTI_IMAGE_PARTITION = 4
VIDEO_PARTITION = 1
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class MediaRef:
    kind: str  # "image" | "video"
    url: str
    where: str


Part = Union[str, MediaRef]


@dataclass
class ParsedMessage:
    speaker: str
    parts: List[Part] = field(default_factory=list)


def _brief(value: Any, limit: int = 40) -> str:
    """A client's value for an error message: its repr (which escapes surrogates), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_unicode(value: str, where: str, what: str) -> None:
    """Refuse a string holding a lone surrogate, which would fail later, in the tokenizer or a URL parser."""
    match = _LONE_SURROGATE.search(value)
    if match:
        raise Ovis2RequestError(
            f"{where}: the {what} is not valid Unicode: it holds a lone surrogate "
            f"U+{ord(match.group()):04X} at character {match.start()}"
        )


def _check_text(value: str, where: str) -> None:
    _check_unicode(value, where, "text")
    if IMAGE_MARKER in value:
        raise Ovis2RequestError(
            f"{where}: text may not contain the reserved marker {IMAGE_MARKER}; send images as image_url parts"
        )


def _media_url(part: Dict[str, Any], key: str, where: str) -> str:
    value = part.get(key)
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value.strip():
        raise Ovis2RequestError(f"{where}: {key} needs a non-empty url string")
    _check_unicode(value, where, f"{key} url")
    return value


def parse_messages(messages: Any) -> List[ParsedMessage]:
    """Validate the structure and the text of OpenAI-style messages, before anything is fetched."""
    if not isinstance(messages, list) or not messages:
        raise Ovis2RequestError("messages: need a non-empty list of messages")
    parsed: List[ParsedMessage] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise Ovis2RequestError(f"{where}: each message must be an object")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise Ovis2RequestError(
                f"{where}.role: {_brief(role)} is not supported by Ovis2; use one of {sorted(ROLES)}"
            )
        content = message.get("content")
        item = ParsedMessage(ROLES[role])
        if isinstance(content, str):
            _check_text(content, f"{where}.content")
            item.parts.append(content)
        elif isinstance(content, list):
            for position, part in enumerate(content):
                part_where = f"{where}.content[{position}]"
                if not isinstance(part, dict):
                    raise Ovis2RequestError(f"{part_where}: each content part must be an object")
                kind = part.get("type")
                named = isinstance(kind, str)  # a list or object is unhashable: no "in MEDIA_TYPES"
                if named and kind in TEXT_TYPES:
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise Ovis2RequestError(f"{part_where}: a text part needs a string 'text'")
                    _check_text(text, part_where)
                    item.parts.append(text)
                elif named and kind in MEDIA_TYPES:
                    if role != "user":
                        raise Ovis2RequestError(f"{part_where}: {kind} is only accepted in user messages")
                    item.parts.append(MediaRef(MEDIA_TYPES[kind], _media_url(part, kind, part_where), part_where))
                else:
                    raise Ovis2RequestError(
                        f"{part_where}: unsupported content type {_brief(kind)}; "
                        f"Ovis2 accepts text, image_url and video_url"
                    )
        elif content is None and role == "assistant":
            pass
        else:
            raise Ovis2RequestError(f"{where}.content: must be a string or a list of content parts")
        parsed.append(item)
    if parsed[-1].speaker != "human":
        raise Ovis2RequestError("messages: the last message must come from the user")
    return parsed


def media_refs(parsed: Sequence[ParsedMessage]) -> List[MediaRef]:
    return [p for m in parsed for p in m.parts if isinstance(p, MediaRef)]


def default_max_partition(parsed: Sequence[ParsedMessage]) -> Optional[int]:
    refs = media_refs(parsed)
    if not refs:
        return None
    if any(r.kind == "video" for r in refs):
        return VIDEO_PARTITION
    return SINGLE_IMAGE_PARTITION if len(refs) == 1 else MULTI_IMAGE_PARTITION


@dataclass
class Conversation:
    turns: List[Turn]
    images: List[Image.Image]
    max_partition: Optional[int]


def build_conversation(
    messages: Any,
    limits: MediaLimits,
    max_partition: Optional[int] = None,
    video_frames: Optional[int] = None,
) -> Conversation:
    """Validate, fetch and decode: the turns and images ready for preprocessing."""
    parsed = parse_messages(messages)
    refs = media_refs(parsed)
    images_requested = sum(1 for r in refs if r.kind == "image")
    if images_requested > limits.max_images:
        raise Ovis2LimitError(
            f"messages: {images_requested} images in one request, over the limit of "
            f"{limits.max_images} ({ENV_MAX_IMAGES})"
        )
    frames = video_frames or limits.video_frames
    videos = sum(1 for r in refs if r.kind == "video")
    if videos * frames > limits.max_video_frames:
        raise Ovis2LimitError(
            f"messages: {videos} video(s) x {frames} frames is over the limit of "
            f"{limits.max_video_frames} frames per request ({ENV_MAX_VIDEO_FRAMES})"
        )
    if max_partition is not None and (not isinstance(max_partition, int) or max_partition < 1):
        raise Ovis2RequestError(f"max_partition: must be a positive integer, got {max_partition!r}")

    budget = MediaBudget(limits)
    decoded: Dict[int, List[Image.Image]] = {}
    for ref in refs:
        data = read_media(ref.url, ref.where)
        if ref.kind == "image":
            decoded[id(ref)] = [decode_image(data, ref.where, limits, budget)]
        else:
            decoded[id(ref)] = decode_video(data, ref.where, limits, frames, budget)

    single_image = len(refs) == 1 and refs[0].kind == "image"
    turns: List[Turn] = []
    images: List[Image.Image] = []
    for message in parsed:
        turn_images = sum(1 for p in message.parts if isinstance(p, MediaRef) and p.kind == "image")
        lines: List[str] = []
        number = 0
        for part in message.parts:
            if isinstance(part, str):
                lines.append(part)
                continue
            frames_or_image = decoded[id(part)]
            images.extend(frames_or_image)
            if part.kind == "video":
                lines.extend([IMAGE_MARKER] * len(frames_or_image))
            elif single_image or turn_images == 1:
                lines.append(IMAGE_MARKER)
            else:
                number += 1
                lines.append(f"Image {number}: {IMAGE_MARKER}")
        turns.append(Turn(message.speaker, "\n".join(lines)))  # type: ignore[arg-type]
    return Conversation(turns, images, max_partition or default_max_partition(parsed))
