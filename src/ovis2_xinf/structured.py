"""Structured output: ``response_format`` (and Xinference's ``guided_*`` fields) as a grammar per request.

A request that asks for JSON gets a grammar (llguidance; why not xgrammar: docs/architecture.md)
and each of its rows samples only tokens the grammar allows: the answer parses, and validates
against the schema, whatever the weights would have said. The end-of-turn token is allowed only
where the grammar may end, and the tokenizer's other special tokens never. JSON is written without
free whitespace (``{"a":1}``): a grammar that allows any run of blanks lets a weak model fill
``max_tokens`` with them.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import torch

from .errors import Ovis2RequestError

GUIDED_FIELDS = ("guided_json", "guided_json_object", "guided_choice", "guided_regex", "guided_grammar")


class Grammars:
    """Grammars for one tokenizer: what a request asks for, checked, and a matcher per row."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_id)

    def compile(self, config: Dict[str, Any]) -> Optional[str]:
        """The grammar a request asks for, or None; a bad request is a 400 naming the field."""
        kind, value = requested(config)
        if kind is None:
            return None
        matcher = self._ll.LLMatcher
        if kind in ("json_object", "json_schema"):
            schema = {"type": "object"} if kind == "json_object" else value
            grammar = matcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
            field = "guided_json" if "guided_json" in config else "response_format.json_schema.schema"
        elif kind == "guided_choice":
            grammar = matcher.grammar_from_lark("start: " + " | ".join(json.dumps(choice) for choice in value))
            field = kind
        elif kind == "guided_regex":
            grammar, field = matcher.grammar_from_regex(value), kind
        else:
            grammar, field = matcher.grammar_from_lark(value), kind
        error = matcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise Ovis2RequestError(f"{field}: {_first_line(error)}")
        return grammar

    def matcher(self, grammar: str) -> "RowGrammar":
        return RowGrammar(self._ll, self._ll.LLMatcher(self._tokenizer, grammar), self.vocab_size)


def _first_line(error: str) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else "invalid grammar"


def requested(config: Dict[str, Any]):
    """(kind, value) of the constraint a request asks for, validated for shape; (None, None) if none."""
    response_format = config.get("response_format")
    guided = {f: config[f] for f in GUIDED_FIELDS if config.get(f) not in (None, False, "", [])}
    if response_format is not None and guided:
        raise Ovis2RequestError(f"response_format and {sorted(guided)[0]}: give one of them, not both")
    if len(guided) > 1:
        raise Ovis2RequestError(f"{' and '.join(sorted(guided))}: give one guided_* field, not several")
    if guided:
        (field, value), = guided.items()
        if field == "guided_json":
            schema = json.loads(value) if isinstance(value, str) else value
            if not isinstance(schema, dict):
                raise Ovis2RequestError("guided_json: must be a JSON schema object")
            return "json_schema", schema
        if field == "guided_json_object":
            return "json_object", None
        if field == "guided_choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
                raise Ovis2RequestError("guided_choice: must be a non-empty list of strings")
            return "guided_choice", value
        if not isinstance(value, str):
            raise Ovis2RequestError(f"{field}: must be a string")
        return field, value
    if response_format is None:
        return None, None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise Ovis2RequestError('response_format: must be an object with a "type"')
    kind = response_format["type"]
    if kind == "text":
        return None, None
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise Ovis2RequestError('response_format.json_schema: must be an object with a "schema"')
        # Xinference's request model renames the field to "schema_" (pydantic reserves "schema").
        schema = spec.get("schema", spec.get("schema_"))
        if not isinstance(schema, dict):
            raise Ovis2RequestError("response_format.json_schema.schema: must be a JSON schema object")
        return "json_schema", schema
    raise Ovis2RequestError(f"response_format.type: {kind!r} is not one of 'text', 'json_object', 'json_schema'")


class RowGrammar:
    """One row's matcher: masks its logits, follows its tokens."""

    def __init__(self, ll: Any, matcher: Any, vocab_size: int):
        import llguidance.torch

        self._torch = llguidance.torch
        self._matcher = matcher
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (1 x vocab, float32) with every token the grammar does not allow at -inf."""
        self._torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        masked = scores.clone()
        self._torch.apply_token_bitmask_inplace(masked, self._bitmask.to(masked.device))
        return masked

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()[:300]}")

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()
