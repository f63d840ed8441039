"""Ovis2 prompt format (Qwen ChatML) and the token ids with image placeholders.

Each turn is tokenized on its own and split at ``<image>`` markers, exactly as the
original conversation formatter does: tokenizing the whole prompt at once can merge
BPE tokens across those boundaries and change the ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch

from .checkpoint import PlaceholderIds
from .preprocessing import IMAGE_ATOM, INDICATORS, ProcessedImage

IMAGE_MARKER = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLE_PREFIX = {
    "system": "<|im_start|>system\n",
    "human": "<|im_start|>user\n",
    "gpt": "<|im_start|>assistant\n",
}
TURN_END = "<|im_end|>\n"
Speaker = Literal["system", "human", "gpt"]


@dataclass(frozen=True)
class Turn:
    speaker: Speaker
    text: str  # may contain IMAGE_MARKER, one per image in order


def format_prompt(turns: Sequence[Turn]) -> List[str]:
    """Text of each turn, the system turn first, ending with an open assistant turn."""
    turns = list(turns)
    if not turns or turns[0].speaker != "system":
        turns.insert(0, Turn("system", DEFAULT_SYSTEM_PROMPT))
    pieces = [ROLE_PREFIX[t.speaker] + t.text + TURN_END for t in turns]
    pieces.append(ROLE_PREFIX["gpt"])
    return pieces


def count_images(turns: Sequence[Turn]) -> int:
    return sum(t.text.count(IMAGE_MARKER) for t in turns)


@dataclass
class EncodedPrompt:
    prompt: str
    input_ids: torch.Tensor  # (1, length), native placeholder ids already expanded
    pixel_values: Optional[torch.Tensor]
    symbolic_ids: List[object]  # text ids and symbolic placeholders, before expansion
    #: each image's tokens (indicators and atoms) as [start, end) positions in ``input_ids``
    image_spans: List[Tuple[int, int]]


def _symbolic_ids(tokenizer, pieces: Sequence[str], images: Sequence[ProcessedImage]
                  ) -> Tuple[List[object], List[Tuple[int, int]]]:
    """The ids with each image's symbolic layout, and where each layout sits among them."""
    ids: List[object] = []
    spans: List[Tuple[int, int]] = []
    image_index = 0
    for piece in pieces:
        chunks = piece.split(IMAGE_MARKER)
        for position, chunk in enumerate(chunks):
            ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
            if position < len(chunks) - 1:
                spans.append((len(ids), len(ids) + len(images[image_index].layout)))
                ids.extend(images[image_index].layout)
                image_index += 1
    return ids, spans


def encode(
    tokenizer,
    turns: Sequence[Turn],
    images: Sequence[ProcessedImage],
    placeholders: PlaceholderIds,
    tokens_per_crop: int,
) -> EncodedPrompt:
    """Prompt text, native input ids and stacked pixel values for one conversation."""
    if count_images(turns) != len(images):
        raise ValueError(
            f"the conversation has {count_images(turns)} {IMAGE_MARKER} markers but {len(images)} images"
        )
    pieces = format_prompt(turns)
    symbolic, symbolic_spans = _symbolic_ids(tokenizer, pieces, images)
    indicator_ids: Dict[str, int] = dict(zip(INDICATORS, placeholders.indicators))
    native: List[int] = []
    starts: List[int] = []  # native position of each symbolic item, and of the end
    for item in symbolic:
        starts.append(len(native))
        if item == IMAGE_ATOM:
            native.extend([placeholders.atom] * tokens_per_crop)
        elif isinstance(item, str):
            native.append(indicator_ids[item])
        else:
            native.append(int(item))
    starts.append(len(native))
    spans = [(starts[begin], starts[end]) for begin, end in symbolic_spans]
    return EncodedPrompt("".join(pieces), torch.tensor([native], dtype=torch.long), _stacked(images), symbolic, spans)


def _stacked(images: Sequence[ProcessedImage]) -> Optional[torch.Tensor]:
    """All crops in one tensor; without a copy when the images come from one
    ``Ovis2ImagePreprocessor.batch`` (a copy is 21 MB per photo at max_partition 9)."""
    if not images:
        return None
    values = [image.pixel_values for image in images]
    whole = values[0]._base
    if whole is not None and whole.is_contiguous() and whole.shape[0] == sum(v.shape[0] for v in values):
        offset = whole.storage_offset()
        for value in values:
            if value._base is not whole or value.storage_offset() != offset:
                break
            offset += value.numel()
        else:
            return whole
    if len(values) == 1:
        return values[0]
    return torch.cat(values)


def original_ids(symbolic: Sequence[object]) -> List[int]:
    """The ids the original implementation produces (negative placeholder ids)."""
    mapping = {IMAGE_ATOM: -300, **{name: -301 - i for i, name in enumerate(INDICATORS)}}
    return [mapping[x] if isinstance(x, str) else int(x) for x in symbolic]
