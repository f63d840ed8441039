"""Structured output: ``response_format`` (and Xinference's ``guided_*`` fields) as a grammar per request.

A request that asks for JSON gets a grammar (llguidance; why not xgrammar: docs/architecture.md)
and each of its rows samples only tokens the grammar allows: the answer parses, and validates
against the schema, whatever the weights would have said. The end-of-turn token is allowed only
where the grammar may end, and the tokenizer's other special tokens never. JSON is written without
free whitespace (``{"a":1}``): a grammar that allows any run of blanks lets a weak model fill
``max_tokens`` with them.

A constraint comes from the client, so what it may cost is bounded before any work is done
(:class:`GrammarLimits`): the schema's size as JSON and its nesting depth (measured without
recursion, on the text before it is parsed and on an already parsed object alike), the size of a
regex or grammar, the number and size of choices. Within those bounds llguidance's own limits
(``LLParserLimits``: lexer fuel, grammar size, Earley items per mask) bound the compile and each
token's mask. The compile runs once per request, on a thread of its own whose stack is sized for the
largest input allowed: llguidance follows ``$ref`` chains by recursion, and a chain of a thousand
references, a few dozen KiB of schema, overflows a thread's usual 8 MiB stack, which kills the whole
worker process rather than raising. Every row of the request then starts from a copy of that one
compiled matcher.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, TypeVar

import torch

from .errors import Ovis2LimitError, Ovis2RequestError
from .settings import env_int

GUIDED_FIELDS = ("guided_json", "guided_json_object", "guided_choice", "guided_regex", "guided_grammar")
SCHEMA_FIELD = "response_format.json_schema.schema"

ENV_MAX_SCHEMA_BYTES = "OVIS2_XINF_MAX_SCHEMA_BYTES"
ENV_MAX_SCHEMA_DEPTH = "OVIS2_XINF_MAX_SCHEMA_DEPTH"
ENV_MAX_GRAMMAR_BYTES = "OVIS2_XINF_MAX_GRAMMAR_BYTES"
ENV_MAX_CHOICES = "OVIS2_XINF_MAX_CHOICES"
# llguidance reads a grammar's JSON with serde_json, which stops at 128 levels: a deeper setting
# could never compile.
DEPTH_CEILING = 128
# Raising the byte limits raises the worst compile time faster than linearly (some of llguidance's
# schema work is quadratic in the schema's size).
BYTES_CEILING = 256 << 10
# Stack that llguidance's compile may need per byte of grammar text: the deepest recursion per byte
# found takes about 900 (a chain of Lark rules, each nesting the next in 24 parentheses; a ``$ref``
# chain through nested ``anyOf`` about 350). Four times that covers constructions not found;
# stack never touched costs address space, not memory.
STACK_PER_GRAMMAR_BYTE = 4096
MIN_COMPILE_STACK = 16 << 20
MESSAGE_CHARS = 300

_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
_T = TypeVar("_T")
_STACK_LOCK = threading.Lock()


@dataclass(frozen=True)
class GrammarLimits:
    """What one request's constraint may cost, checked before anything is parsed or compiled.

    The defaults fit the real-world schemas of JSONSchemaBench but its largest: the deepest nests
    27 levels, 99% are under 80 KiB, those over 64 KiB are whole Kubernetes and SchemaStore
    definitions rather than answer formats, and none under 64 KiB has more than 9 KiB of
    patterns. Regular expressions get the tighter bound because llguidance's work on them grows
    faster than their size and outside its fuel limits: ``(a|aa)*`` repeated to 64 KiB takes
    seconds and half a GiB before it is refused, to 16 KiB a tenth of that.
    """

    schema_bytes: int = 64 << 10  # the schema as compact JSON, UTF-8
    schema_depth: int = 64  # nested objects and arrays, the schema itself being 1
    # Text that becomes regular expressions or grammar rules: guided_regex, guided_grammar, all
    # guided_choice strings together, and all of a schema's patterns together.
    grammar_bytes: int = 16 << 10
    choices: int = 1024

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "GrammarLimits":
        """The limits the environment sets, the defaults elsewhere; a bad value is a ValueError."""
        defaults = cls()
        return cls(
            schema_bytes=env_int(ENV_MAX_SCHEMA_BYTES, defaults.schema_bytes, BYTES_CEILING, environ),
            schema_depth=env_int(ENV_MAX_SCHEMA_DEPTH, defaults.schema_depth, DEPTH_CEILING, environ),
            grammar_bytes=env_int(ENV_MAX_GRAMMAR_BYTES, defaults.grammar_bytes, BYTES_CEILING, environ),
            choices=env_int(ENV_MAX_CHOICES, defaults.choices, 1 << 20, environ),
        )


@lru_cache(maxsize=1)
def default_limits() -> GrammarLimits:
    """The environment's limits, read once per process."""
    return GrammarLimits.from_env()


class Constraint(NamedTuple):
    """What a request asks for: ``kind``, the request field it came from, and its checked value
    (a schema as compact JSON text, a list of choices, a regex or grammar text; None for any object)."""

    kind: str
    field: str
    value: Any


class CompiledGrammar(NamedTuple):
    """A request's grammar, compiled once: each row gets a copy of ``template``."""

    field: str
    template: Any  # llguidance.LLMatcher, never advanced


class Grammars:
    """Grammars for one tokenizer: what a request asks for, checked, and a matcher per row."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int, limits: Optional[GrammarLimits] = None):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.limits = limits if limits is not None else default_limits()
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_id)
        # llguidance's defaults bound the compile (lexer fuel, grammar size) and each mask (lexer
        # fuel and Earley items per step); its verbose errors would echo parser state to the client.
        self._parser_limits = llguidance.LLParserLimits(verbose_errors=False)

    def compile(self, config: Dict[str, Any]) -> Optional[CompiledGrammar]:
        """The grammar a request asks for, or None; a bad or too costly request is a 400 naming the field."""
        constraint = constraint_of(config, self.limits)
        if constraint is None:
            return None
        grammar = self._grammar_text(constraint)
        stack = max(MIN_COMPILE_STACK, STACK_PER_GRAMMAR_BYTE * len(grammar.encode("utf-8")))
        template = _on_own_stack(lambda: self._template(grammar), stack)
        error = template.get_error()
        if error:
            raise Ovis2RequestError(f"{constraint.field}: {_first_line(error)}")
        return CompiledGrammar(constraint.field, template)

    def matcher(self, grammar: CompiledGrammar) -> "RowGrammar":
        """A row's own matcher: a copy of the compiled one, so nothing is compiled again."""
        return RowGrammar(self._ll, grammar.template.deep_copy(), self.vocab_size, grammar.field)

    def _grammar_text(self, constraint: Constraint) -> str:
        matcher = self._ll.LLMatcher
        kind, field, value = constraint
        try:
            if kind in ("json_object", "json_schema"):
                schema = '{"type":"object"}' if kind == "json_object" else value
                return matcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
            if kind == "guided_choice":
                return "start: " + " | ".join(json.dumps(choice) for choice in value)
            if kind == "guided_regex":
                return matcher.grammar_from_regex(value)
            return value
        except ValueError as exc:
            raise Ovis2RequestError(f"{field}: {_first_line(str(exc))}") from None

    def _template(self, grammar: str) -> Any:
        """The compiled matcher, with its first mask computed: the lexer states that mask builds are
        shared by every copy, and a grammar too complex for even one step is refused here, not
        after the first row starts."""
        template = self._ll.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._parser_limits)
        if not template.is_error():
            template.compute_bitmask()
        return template


def _on_own_stack(work: Callable[[], _T], stack_bytes: int) -> _T:
    """``work()`` run on a new thread with a stack of ``stack_bytes``, its result or exception passed on.

    The stack size is a process-wide setting for threads started after it, so it is set and put
    back around this one start; a thread started elsewhere meanwhile only gets a larger stack.
    """
    outcome: List[Tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed to the caller's thread below
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="ovis2-grammar-compile", daemon=True)
    with _STACK_LOCK:
        previous = threading.stack_size(stack_bytes)
        try:
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    ok, result = outcome[0]
    if not ok:
        raise result
    return result


def _first_line(error: str) -> str:
    """An llguidance error, short: its first lines, cut (some errors echo the whole grammar), without
    the marker that says parser details were left out."""
    lines = [line.strip() for line in str(error).replace("<non-verbose/>", "").strip().splitlines() if line.strip()]
    text = " ".join(lines[:3]) if lines else "invalid grammar"
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS - 3] + "..."


def requested(config: Dict[str, Any], limits: Optional[GrammarLimits] = None) -> Tuple[Optional[str], Any]:
    """(kind, value) of the constraint a request asks for, checked for shape and limits; (None, None) if none."""
    constraint = constraint_of(config, limits)
    return (None, None) if constraint is None else (constraint.kind, constraint.value)


def _given(field: str, value: Any) -> bool:
    """Whether a ``guided_*`` field asks for something: any value but None (and false for the flag).
    An empty list or string is asked for, and refused, not read as "unconstrained"."""
    return value is not None and not (field == "guided_json_object" and value is False)


def constraint_of(config: Dict[str, Any], limits: Optional[GrammarLimits] = None) -> Optional[Constraint]:
    """The constraint a request asks for, checked for shape and limits before anything is compiled;
    None if none. Every fault is an ``Ovis2RequestError`` naming the field."""
    limits = limits if limits is not None else default_limits()
    response_format = config.get("response_format")
    guided = {f: config[f] for f in GUIDED_FIELDS if _given(f, config.get(f))}
    if response_format is not None and guided:
        raise Ovis2RequestError(f"response_format and {sorted(guided)[0]}: give one of them, not both")
    if len(guided) > 1:
        raise Ovis2RequestError(f"{' and '.join(sorted(guided))}: give one guided_* field, not several")
    if guided:
        (field, value), = guided.items()
        if field == "guided_json":
            return Constraint("json_schema", field, _schema(field, value, limits))
        if field == "guided_json_object":
            if value is not True:
                raise Ovis2RequestError(f"guided_json_object: must be true or false, got {_short(value)}")
            return Constraint("json_object", field, None)
        if field == "guided_choice":
            return Constraint(field, field, _choices(value, limits))
        if not isinstance(value, str) or not value:
            raise Ovis2RequestError(f"{field}: must be a non-empty string")
        size = _utf8_size(field, value)
        if size > limits.grammar_bytes:
            raise Ovis2LimitError(f"{field}: {size} bytes, over the limit of {limits.grammar_bytes} "
                                  f"(setting: {ENV_MAX_GRAMMAR_BYTES})")
        return Constraint(field, field, value)
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise Ovis2RequestError('response_format: must be an object with a "type"')
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object", "response_format", None)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise Ovis2RequestError('response_format.json_schema: must be an object with a "schema"')
        # Xinference's request model renames the field to "schema_" (pydantic reserves "schema").
        schema = spec.get("schema", spec.get("schema_"))
        if not isinstance(schema, dict):
            raise Ovis2RequestError(f"{SCHEMA_FIELD}: must be a JSON schema object")
        return Constraint("json_schema", SCHEMA_FIELD, _schema(SCHEMA_FIELD, schema, limits))
    raise Ovis2RequestError(f"response_format.type: {_short(kind)} is not one of 'text', 'json_object', 'json_schema'")


def _short(value: Any) -> str:
    """A value for a message: a scalar shown, cut; a container by its type alone, since the repr of
    a hostile nest recurses, and of a huge one costs its size."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and abs(value) < 10**18):
        return repr(value)
    return f"<{type(value).__name__}>"


def _utf8_size(field: str, text: str) -> int:
    """Bytes of ``text`` in UTF-8; a lone surrogate (JSON allows "\\ud800") is not text, and a 400."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise Ovis2RequestError(f"{field}: not valid Unicode text ({exc.reason} at {exc.start})") from None


def _over_bytes(field: str, size: str, limits: GrammarLimits) -> Ovis2LimitError:
    return Ovis2LimitError(f"{field}: the schema is {size} bytes of JSON, over the limit of {limits.schema_bytes} "
                           f"(setting: {ENV_MAX_SCHEMA_BYTES})")


def _over_depth(field: str, depth: str, limits: GrammarLimits) -> Ovis2LimitError:
    return Ovis2LimitError(f"{field}: the schema nests {depth} levels of objects and arrays, over the limit of "
                           f"{limits.schema_depth} (setting: {ENV_MAX_SCHEMA_DEPTH})")


def _schema(field: str, value: Any, limits: GrammarLimits) -> str:
    """A schema (JSON text or an object already parsed) as compact JSON text, within the limits.

    Text is measured (size, then bracket depth) before ``json.loads``, whose recursion a deep
    nest would exhaust; a parsed object is walked without recursion, stopping as soon as it is
    too deep or too large, before ``json.dumps`` recurses into it.
    """
    if isinstance(value, str):
        size = _utf8_size(field, value)
        if size > limits.schema_bytes:
            raise _over_bytes(field, str(size), limits)
        depth = _text_depth(value)
        if depth > limits.schema_depth:
            raise _over_depth(field, str(depth), limits)
        try:
            value = json.loads(value, parse_constant=_not_json)
        except ValueError as exc:
            raise Ovis2RequestError(f"{field}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise Ovis2RequestError(f"{field}: must be a JSON schema object")
    _check_tree(field, value, limits)
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise Ovis2RequestError(f"{field}: not JSON ({exc})") from None
    size = _utf8_size(field, text)
    if size > limits.schema_bytes:
        raise _over_bytes(field, str(size), limits)
    return text


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _text_depth(text: str) -> int:
    """How deep JSON text nests objects and arrays, brackets inside strings not counted; linear time."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


def _check_tree(field: str, schema: Dict[str, Any], limits: GrammarLimits) -> None:
    """Refuse a parsed schema deeper than the limit, or surely larger, without recursion.

    A lower bound on its size as compact JSON grows with every value visited (each value at
    least one byte; a member adds at least ``"":`` and a comma, an item a comma, a string its
    characters and quotes) and is checked before a container's members are taken, so the walk
    ends within about ``schema_bytes`` values however large the object is.
    """
    pending: List[Tuple[Any, int]] = [(schema, 1)]
    at_least, patterns = 1, 0
    while pending:
        value, depth = pending.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth > limits.schema_depth:
                raise _over_depth(field, f"more than {limits.schema_depth}", limits)
            at_least += max(1, (5 if isinstance(value, dict) else 2) * len(value))
            if at_least > limits.schema_bytes:
                raise _over_bytes(field, f"more than {limits.schema_bytes}", limits)
            if isinstance(value, dict):
                at_least += sum(len(str(key)) for key in value)
                patterns += _pattern_bytes(field, value)
                value = value.values()
            pending.extend((child, depth + 1) for child in value)
        elif isinstance(value, str):
            at_least += len(value) + 1
        if at_least > limits.schema_bytes:
            raise _over_bytes(field, f"more than {limits.schema_bytes}", limits)
    if patterns > limits.grammar_bytes:
        raise Ovis2LimitError(f"{field}: its patterns take {patterns} bytes, over the limit of {limits.grammar_bytes} "
                              f"(setting: {ENV_MAX_GRAMMAR_BYTES})")


def _pattern_bytes(field: str, schema: Dict[Any, Any]) -> int:
    """Bytes of the regular expressions one schema object gives llguidance: ``pattern``, the keys
    of ``patternProperties``, and ``x-guidance``'s ``whitespace_pattern``."""
    texts = [schema.get("pattern"), schema.get("whitespace_pattern")]
    if isinstance(schema.get("patternProperties"), dict):
        texts += list(schema["patternProperties"])
    return sum(_utf8_size(field, text) for text in texts if isinstance(text, str))


def _choices(value: Any, limits: GrammarLimits) -> List[str]:
    if not isinstance(value, list) or not value:
        raise Ovis2RequestError("guided_choice: must be a non-empty list of strings")
    if len(value) > limits.choices:
        raise Ovis2LimitError(f"guided_choice: {len(value)} choices, over the limit of {limits.choices} "
                              f"(setting: {ENV_MAX_CHOICES})")
    total = 0
    for index, choice in enumerate(value):
        if not isinstance(choice, str):
            raise Ovis2RequestError(f"guided_choice: must be a non-empty list of strings, item {index} is "
                                    f"{type(choice).__name__}")
        total += _utf8_size(f"guided_choice[{index}]", choice)
    if total > limits.grammar_bytes:
        raise Ovis2LimitError(f"guided_choice: the choices take {total} bytes, over the limit of "
                              f"{limits.grammar_bytes} (setting: {ENV_MAX_GRAMMAR_BYTES})")
    return value


class RowGrammar:
    """One row's matcher: masks its logits, follows its tokens."""

    def __init__(self, ll: Any, matcher: Any, vocab_size: int, field: str = "grammar"):
        import llguidance.torch

        self._torch = llguidance.torch
        self._matcher = matcher
        self._field = field
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (1 x vocab, float32) with every token the grammar does not allow at -inf."""
        self._torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        masked = scores.clone()
        self._torch.apply_token_bitmask_inplace(masked, self._bitmask.to(masked.device))
        return masked

    def accept(self, token: int) -> None:
        """Follow ``token``; a grammar that fails past its compile (llguidance's per-token limits,
        say) ends this request alone, naming its field."""
        if not self._matcher.consume_token(token):
            raise Ovis2LimitError(f"{self._field}: the grammar failed during generation: "
                                  f"{_first_line(self._matcher.get_error() or 'token refused')}")

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()
