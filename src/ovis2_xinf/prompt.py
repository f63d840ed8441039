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
from .errors import Ovis2LimitError
from .preprocessing import IMAGE_ATOM, INDICATORS, Grid, ProcessedImage, placeholder_layout

IMAGE_MARKER = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLE_PREFIX = {
    "system": "<|im_start|>system\n",
    "human": "<|im_start|>user\n",
    "gpt": "<|im_start|>assistant\n",
}
TURN_END = "<|im_end|>\n"
#: Text longer than this is first counted slice by slice, stopping once it cannot fit the
#: context, so a huge text costs what a context's worth of it costs, not its whole length.
TEXT_SLICE = 1 << 15
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


def image_tokens(grid: Grid, tokens_per_crop: int) -> int:
    """Tokens one image takes in the prompt: its indicators and ``tokens_per_crop`` per crop."""
    return sum(tokens_per_crop if item == IMAGE_ATOM else 1 for item in placeholder_layout(grid))


def _slices(text: str) -> List[str]:
    """``text`` cut into slices of about :data:`TEXT_SLICE` characters, each cut made before a
    single space between two words where one is near, so that the slices tokenize as the whole does."""
    slices, start = [], 0
    while len(text) - start > TEXT_SLICE:
        end = start + TEXT_SLICE
        cut = text.rfind(" ", end - TEXT_SLICE // 8, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1:cut + 2].isspace()):
            cut = text.rfind(" ", end - TEXT_SLICE // 8, cut)
        end = cut if cut > start else end
        slices.append(text[start:end])
        start = end
    slices.append(text[start:])
    return slices


def _refuse_if_over(tokenizer, text: str, budget: int) -> None:
    """Raise once the slices of a long text hold more tokens than ``budget`` (with one token of
    slack per cut, since a cut inside a word can split one of its tokens)."""
    counted = 0
    slices = _slices(text)
    for number, piece in enumerate(slices, start=1):
        counted += len(tokenizer(piece, add_special_tokens=False).input_ids)
        if counted > budget + number:
            raise Ovis2LimitError(
                f"messages: the text holds over {budget} tokens, more than the context length leaves "
                "for it; send less text")


def _symbolic_ids(tokenizer, pieces: Sequence[str], images: Sequence[ProcessedImage],
                  max_text_tokens: Optional[int] = None) -> Tuple[List[object], List[Tuple[int, int]]]:
    """The ids with each image's symbolic layout, and where each layout sits among them."""
    ids: List[object] = []
    spans: List[Tuple[int, int]] = []
    image_index = 0
    text_tokens = 0
    for piece in pieces:
        chunks = piece.split(IMAGE_MARKER)
        for position, chunk in enumerate(chunks):
            if max_text_tokens is not None and len(chunk) > TEXT_SLICE:
                _refuse_if_over(tokenizer, chunk, max_text_tokens - text_tokens)
            chunk_ids = tokenizer(chunk, add_special_tokens=False).input_ids
            text_tokens += len(chunk_ids)
            ids.extend(chunk_ids)
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
    max_tokens: Optional[int] = None,
) -> EncodedPrompt:
    """Prompt text, native input ids and stacked pixel values for one conversation.

    With ``max_tokens`` (the context length) a text that cannot fit beside the images is
    refused after tokenizing about as much of it as could fit, not all of it.
    """
    if count_images(turns) != len(images):
        raise ValueError(
            f"the conversation has {count_images(turns)} {IMAGE_MARKER} markers but {len(images)} images"
        )
    pieces = format_prompt(turns)
    text_budget = None
    if max_tokens is not None:
        text_budget = max_tokens - sum(image_tokens(image.grid, tokens_per_crop) for image in images)
    symbolic, symbolic_spans = _symbolic_ids(tokenizer, pieces, images, text_budget)
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
