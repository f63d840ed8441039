"""Sampling settings, and the text of the token stream shared by streaming and non-streaming chat.

Both paths read the same stream of token batches from the scheduler
(:mod:`ovis2_xinf.batching`), so for the same seed they produce the same text. A batch
holds whatever was generated since the last pull, so a consumer slower than the model
(each streamed chunk is a round trip between Xinference's processes) sends fewer, larger
chunks instead of falling behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence


from .errors import Ovis2LimitError, Ovis2RequestError

SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
DEFAULT_MAX_TOKENS = 1024


@dataclass
class SamplingPlan:
    generate_kwargs: Dict[str, Any]
    seed: Optional[int]
    stop: List[str]
    max_new_tokens: int
    #: OpenAI's penalties over the answer's own tokens (``generate`` has none of its own)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


def _number(config: Dict[str, Any], key: str, kind: type, low: float, high: float) -> Any:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Ovis2RequestError(f"{key}: must be a number, got {value!r}")
    if not low <= value <= high:
        raise Ovis2RequestError(f"{key}: {value} is outside [{low}, {high}]")
    return kind(value)


def plan_sampling(
    config: Dict[str, Any],
    checkpoint_defaults: Dict[str, Any],
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    prompt_tokens: int,
    context_length: int,
) -> SamplingPlan:
    """Merge request settings over the checkpoint's generation_config.json."""
    if prompt_tokens >= context_length:
        raise Ovis2LimitError(
            f"messages: the prompt's {prompt_tokens} tokens (text and image tokens together) reach the "
            f"context length of {context_length}; send fewer or smaller images or less text"
        )
    defaults = {**SAMPLING_DEFAULTS, **{k: v for k, v in checkpoint_defaults.items() if k in SAMPLING_DEFAULTS}}
    temperature = _number(config, "temperature", float, 0.0, 100.0)
    top_p = _number(config, "top_p", float, 0.0, 1.0)
    top_k = _number(config, "top_k", int, -1, 1_000_000)
    repetition_penalty = _number(config, "repetition_penalty", float, 0.01, 100.0)
    max_tokens = _number(config, "max_tokens", int, 1, 10**9) or DEFAULT_MAX_TOKENS
    seed = _number(config, "seed", int, -(2**63), 2**63 - 1)
    frequency_penalty = _number(config, "frequency_penalty", float, -2.0, 2.0) or 0.0
    presence_penalty = _number(config, "presence_penalty", float, -2.0, 2.0) or 0.0

    do_sample = bool(defaults["do_sample"])
    if temperature is not None:
        do_sample = temperature > 0
    kwargs: Dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        kwargs["temperature"] = temperature if temperature is not None else defaults["temperature"]
        kwargs["top_p"] = top_p if top_p is not None else defaults["top_p"]
        chosen_top_k = top_k if top_k is not None else defaults["top_k"]
        kwargs["top_k"] = None if chosen_top_k in (-1, 0) else chosen_top_k
    kwargs["repetition_penalty"] = (
        repetition_penalty if repetition_penalty is not None else defaults["repetition_penalty"]
    )

    stop_ids = config.get("stop_token_ids") or []
    if isinstance(stop_ids, int):
        stop_ids = [stop_ids]
    if not isinstance(stop_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
        raise Ovis2RequestError(f"stop_token_ids: must be a list of integers, got {stop_ids!r}")
    eos = list(dict.fromkeys([*eos_token_ids, *stop_ids]))

    stop = config.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise Ovis2RequestError(f"stop: must be a string or a list of strings, got {stop!r}")
    stop = [s for s in stop if s]

    max_new_tokens = min(max_tokens, context_length - prompt_tokens)
    kwargs.update(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_token_id, use_cache=True)
    if config.get("ignore_eos"):
        kwargs["min_new_tokens"] = max_new_tokens
    return SamplingPlan(kwargs, seed, stop, max_new_tokens, frequency_penalty, presence_penalty)


@dataclass
class TextEvent:
    text: str
    finish_reason: Optional[str]
    completion_tokens: int


class IncrementalText:
    """The text of a growing answer, decoding only the tokens since its last complete character.

    Decoding the whole answer again for every streamed chunk costs time quadratic in its
    length (one token per chunk, 4096 tokens: 0.4 ms per token on average with the bundled
    tokenizer, 0.8 ms at the end). Here each call decodes a window that starts where the text
    was last complete, so a long answer costs the same per token as a short one. Characters
    split across tokens (a byte-level BPE token can hold part of a UTF-8 sequence) are held
    back until they are whole. With the byte-level BPE tokenizers of Ovis2 checkpoints (Qwen2.5's,
    which do not clean up spaces between tokens) the text is the same as one decode of all the
    tokens.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.ids: List[int] = []
        self._start = 0  # window start: the text of ids[:_start] is settled
        self._read = 0  # ids[:_read] are in the text handed out

    def _decode(self, ids: List[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def take(self, final: bool = False) -> str:
        """Text of the ids added since the last call that returned some; with ``final``, all of it."""
        settled = self._decode(self.ids[self._start: self._read])
        window = self._decode(self.ids[self._start:])
        if not final and (len(window) <= len(settled) or window.endswith("\ufffd")):
            return ""  # nothing new, or an incomplete UTF-8 sequence: wait for the next token
        self._start, self._read = self._read, len(self.ids)
        return window[len(settled):]


def _first_stop(text: str, stops: Sequence[str], start: int) -> int:
    """Where the earliest stop string begins in ``text[start:]``, or -1."""
    return min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)


class TextDeltas:
    """The text of an answer as deltas for the client, honouring stop strings and eos.

    Text that might be the start of a stop string is held back until it is known not
    to be one, so a stop string never reaches the client. Each batch of tokens costs time in
    its own length and the stop strings', not the answer's.
    """

    def __init__(self, tokenizer, plan: SamplingPlan, eos_token_ids: Sequence[int]):
        self._eos = set(eos_token_ids) | set(plan.generate_kwargs["eos_token_id"])
        self._stops = plan.stop
        self._answer = IncrementalText(tokenizer)
        # A stop string ending before the newest text would have been found already.
        self._overlap = max((len(s) for s in plan.stop), default=1) - 1
        self._text = ""
        self._emitted = 0
        self._finish_reason = "length"
        self._cut = -1

    @property
    def ended(self) -> bool:
        """An eos token or a stop string has been seen: the row's later tokens are not wanted."""
        return self._cut >= 0 or self._finish_reason == "stop"

    def feed(self, batch: List[int]) -> Optional[TextEvent]:
        """The text these tokens make ready for the client, if any."""
        for token in batch:
            if token in self._eos:
                self._finish_reason = "stop"
                break
            self._answer.ids.append(token)
        searched = max(0, len(self._text) - self._overlap)
        self._text += self._answer.take()
        self._cut = _first_stop(self._text, self._stops, searched)
        if self.ended:
            return None
        held = max((n for s in self._stops for n in range(1, len(s)) if self._text.endswith(s[:n])), default=0)
        ready = len(self._text) - held
        if ready <= self._emitted:
            return None
        event = TextEvent(self._text[self._emitted:ready], None, len(self._answer.ids))
        self._emitted = ready
        return event

    def finish(self) -> List[TextEvent]:
        """The rest of the text (characters still incomplete, text held back) and the finish reason."""
        text = self._text
        if self._cut < 0:
            searched = max(0, len(text) - self._overlap)
            text += self._answer.take(final=True)
            self._cut = _first_stop(text, self._stops, searched)
        count = len(self._answer.ids)
        finish_reason = self._finish_reason
        if self._cut >= 0:
            finish_reason = "stop"
            text = text[:self._cut]
        elif finish_reason == "stop":
            count += 1  # the eos token
        events = [TextEvent(text[self._emitted:], None, count)] if len(text) > self._emitted else []
        return events + [TextEvent("", finish_reason, count)]


async def stream_text(
    batches: AsyncIterator[List[int]], tokenizer, plan: SamplingPlan, eos_token_ids: Sequence[int]
) -> AsyncIterator[TextEvent]:
    """Text deltas of the batches of token ids (see :class:`TextDeltas`), one event per batch at most;
    the batches' iterator is closed as soon as the answer has ended, which ends its row."""
    watch = TextDeltas(tokenizer, plan, eos_token_ids)
    try:
        async for batch in batches:
            event = watch.feed(batch)
            if event is not None:
                yield event
            if watch.ended:
                break
    finally:
        close = getattr(batches, "aclose", None)
        if close is not None:
            await close()
    for event in watch.finish():
        yield event
