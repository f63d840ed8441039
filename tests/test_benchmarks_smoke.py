"""The benchmarks still run (smoke mode on the tiny fixture); no timing is judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.integration
def test_benchmarks_smoke(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert [r["crops"] for r in sections["preprocess"]["rows"]] == [1, 5, 5]
    assert all(r["back_to_back_ms_min"] > 0 for r in sections["preprocess"]["rows"])
    assert [r["crops"] for r in sections["preprocess"]["requests"]] == [10]
    assert [r["tokens"] for r in sections["detokenize"]["rows"]] == [64]
    memory = sections["memory"]
    assert memory["gptq"]["llm_decoder_bytes"] < memory["pytorch"]["llm_decoder_bytes"]
    serving = sections["serving"]
    assert [r["concurrency"] for r in serving["concurrency"]] == [1, 2]
    assert all(r["all_equal_sequential"] for r in serving["concurrency"])
    assert serving["served"]["prompt_tokens"] == serving["direct"]["prompt_tokens"]


def test_decode_rate_leaves_out_runs_streamed_in_one_chunk(monkeypatch):
    # A few fast tokens can all arrive in one chunk: no decode interval to time, not a crash.
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.serving import decode_rate

    assert decode_rate([(4, 1.0, 1.0)]) is None
    assert decode_rate([(4, 1.0, 1.0), (5, 2.0, 3.0), (3, 1.0, 2.0), (9, 0.0, 1.0)]) == 4.0
