"""Which OpenAI chat request fields the class honours, which it refuses, which change nothing.

A field that would change what a client gets, if the class ignored it, is refused with a 400
naming it: a client asking for tool calls must not get free text that looks like an answer.
Fields that change nothing here are listed in :data:`IGNORED` and documented.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from .errors import Ovis2RequestError

MAX_TOP_LOGPROBS = 20
#: How deeply a request body may nest (objects and lists): deep enough for any message and for
#: a JSON schema at the highest depth structured output can be set to allow (128, checked there
#: with its own message), shallow enough that no recursive parser, validator or pickler
#: downstream runs out of stack (Xinference's request model fails near 600).
MAX_BODY_DEPTH = 160

#: Accepted and without effect on the answer (see docs/architecture.md, "Request fields").
IGNORED = ("user", "service_tier", "parallel_tool_calls", "stream_interval", "guided_decoding_backend",
           "request_id", "cache_salt", "platform")


def _set(config: Dict[str, Any], key: str) -> bool:
    """Whether a field asks for something; ``tool_choice`` "none" and "auto" ask for nothing without tools."""
    empty: tuple = (None, False, "", [], {})
    if key == "tool_choice":
        empty += ("none", "auto")
    return config.get(key) not in empty


def refuse_unsupported(config: Dict[str, Any]) -> None:
    """Raise a 400 for a field whose effect this class cannot give."""
    if _set(config, "tools"):
        raise Ovis2RequestError("tools: Ovis2 does not support tool calls")
    if _set(config, "tool_choice"):
        raise Ovis2RequestError(f"tool_choice: {config['tool_choice']!r} needs tool calls, which Ovis2 does not support")
    if _set(config, "echo"):
        raise Ovis2RequestError("echo: the prompt is not echoed by chat completions")
    if _set(config, "lora_name"):
        raise Ovis2RequestError(f"lora_name: {config['lora_name']!r}: ovis2-xinf serves no LoRA adapters")
    if _set(config, "guided_whitespace_pattern"):
        raise Ovis2RequestError("guided_whitespace_pattern: not supported; the JSON grammar allows standard whitespace")
    top_logprobs(config)


def top_logprobs(config: Dict[str, Any]) -> Optional[int]:
    """None without ``logprobs``, else how many alternatives each token reports (0 to 20)."""
    wanted, top = config.get("logprobs"), config.get("top_logprobs")
    if wanted not in (None, True, False):
        raise Ovis2RequestError(f"logprobs: must be true or false, got {wanted!r}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise Ovis2RequestError(f"top_logprobs: must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
    if not wanted:
        if top:
            raise Ovis2RequestError("top_logprobs: needs logprobs: true")
        return None
    return int(top or 0)


def body_depth(value: Any, limit: int = MAX_BODY_DEPTH) -> int:
    """How deeply ``value`` nests, counted without recursion; stops counting past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_body(body: Dict[str, Any]) -> None:
    """The checks a chat request body gets before Xinference parses it: nesting, then messages."""
    from .messages import parse_messages

    if body_depth(body) > MAX_BODY_DEPTH:
        raise Ovis2RequestError(f"body: nested more than {MAX_BODY_DEPTH} levels deep (objects and lists)")
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise Ovis2RequestError(SEVERAL_CHOICES.format(n=n))
    parse_messages(body.get("messages"))


#: Why ``n > 1`` is refused (Xinference drops ``n`` before a model sees it).
SEVERAL_CHOICES = ("n: {n} choices were asked for, and ovis2-xinf returns one choice per request; send {n} "
                   "requests instead (they decode together in one batch), with different seeds for different samples")
