"""Streaming detokenization cost: time per token of ``TextDeltas`` (the work of ``stream_text``)
as the answer grows.

One token per batch (the server's case when the client keeps up with the model), one stop
string. A cost per token that stays flat as the answer grows means each chunk decodes a
window, not the whole answer; the baseline is one decode of the whole answer, what a
non-streaming server would do once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ovis2_xinf.generation import TextDeltas, plan_sampling
from ovis2_xinf.loader import load_tokenizer

LENGTHS = (256, 1024, 4096)
SAMPLE = "The quick brown fox jumps over the lazy dog. 你好，世界！ Ünïcödé – “quotes” 🦊\n"


def run(checkpoint: Path, lengths: Sequence[int] = LENGTHS, repeats: int = 3) -> List[Dict[str, Any]]:
    tokenizer = load_tokenizer(checkpoint)
    ids = tokenizer(SAMPLE * (max(lengths) // 8 + 1), add_special_tokens=False).input_ids
    plan = plan_sampling({"stop": ["</answer>"]}, {}, [], 0, 1, 10 ** 6)
    rows = []
    for length in lengths:
        answer = ids[:length]
        expected = tokenizer.decode(answer, skip_special_tokens=True)
        streamed, whole = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            deltas = TextDeltas(tokenizer, plan, [])
            events = [deltas.feed([i]) for i in answer] + deltas.finish()
            text = "".join(e.text for e in events if e is not None)
            streamed.append(time.perf_counter() - start)
            if text != expected:
                raise AssertionError(f"{length} tokens: the streamed text differs from one decode of the answer")
            start = time.perf_counter()
            tokenizer.decode(answer, skip_special_tokens=True)
            whole.append(time.perf_counter() - start)
        rows.append({"tokens": length, "stream_ms": min(streamed) * 1e3,
                     "us_per_token": min(streamed) / length * 1e6, "one_decode_ms": min(whole) * 1e3})
    return rows
