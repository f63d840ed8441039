"""OpenAI-shaped ``logprobs``: each token as text and bytes, with its top alternatives.

Ovis2's tokenizers are byte-level BPE: a token may hold part of a UTF-8 character, so its
``bytes`` are the token's own bytes (from the byte-level alphabet), and its ``token`` text is
those bytes decoded, with ``\\xNN`` escapes where a character is incomplete.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, List, Sequence


@lru_cache(maxsize=1)
def _byte_decoder() -> Dict[str, int]:
    """Byte-level BPE's printable alphabet back to bytes (the GPT-2 mapping Qwen's tokenizers use)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenText:
    """Text and bytes of single tokens of one tokenizer (cached: the same tokens recur)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cache: Dict[int, tuple] = {}

    def __call__(self, token_id: int) -> tuple:
        found = self._cache.get(token_id)
        if found is None:
            piece = self._tokenizer.convert_ids_to_tokens(int(token_id))
            decoder = _byte_decoder()
            if piece is not None and all(ch in decoder for ch in piece):
                raw = bytes(decoder[ch] for ch in piece)
            else:  # an added token (special tokens are stored as plain text)
                raw = (piece or "").encode("utf-8")
            found = (raw.decode("utf-8", errors="backslashreplace"), list(raw))
            self._cache[token_id] = found
        return found


def content(records: Sequence[Any], text: TokenText) -> List[Dict[str, Any]]:
    """``choices[].logprobs.content`` for scheduler records (``batching.TokenLogprob``)."""
    entries = []
    for record in records:
        token, raw = text(record.token)
        entries.append({
            "token": token,
            "logprob": record.logprob,
            "bytes": raw,
            "top_logprobs": [
                {"token": text(i)[0], "logprob": lp, "bytes": text(i)[1]} for i, lp in record.top
            ],
        })
    return entries
