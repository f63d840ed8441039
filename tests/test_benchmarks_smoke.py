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
    assert serving["served"]["prompt_tokens"] == serving["direct"]["prompt_tokens"]
    concurrency = sections["concurrency"]
    for name in ("chat", "vision"):
        work = concurrency["workloads"][name]
        assert [r["concurrency"] for r in work["rows"]] == [1, 2]
        for row in work["rows"]:
            assert row["prompt_tokens"] == work["prompt_tokens"]
            assert row["completion_tokens"] == row["concurrency"] * work["max_tokens"]
            assert row["direct_tok_s"] > 0 and row["direct_e2e_tok_s"] > 0 and row["served_e2e_tok_s"] > 0
            assert {"served_over_direct", "e2e_over_direct", "ttft_p95_s", "itl_p95_s"} <= set(row)
        assert {"e2e_over_direct_met", "decode_over_direct_met", "scaling_met"} <= set(concurrency["verdict"][name])
    assert len(concurrency["ttft_under_load"]["loaded_ttft_s"]) == 2
    rows = sections["scheduler"]["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2] and all(r["direct_tok_s"] > 0 for r in rows)
    team = sections["scheduler"]["openmp_team"]
    assert team["alone_tok_s"] > 0 and team["beside_team_tok_s"] > 0 and team["after_thread_ended_tok_s"] > 0
    assert sections["scheduler"]["padding"]["padded_tok_s"] > 0
    pauses = sections["scheduler"]["prefill_pauses"]["settings"]
    assert set(pauses) == {"never", "default"} and pauses["never"]["pauses"] == 0
    assert all(r["longest_gap_s"] > 0 and r["ttft_s"] > 0 and r["solo_ttft_s"] > 0 for r in pauses.values())
    kernels = sections["scheduler"]["linear_kernels"]
    assert [r["concurrency"] for r in kernels] == [1, 2] and all(r["chosen_tok_s"] > 0 for r in kernels)
    multiturn = sections["multiturn"]
    assert [r["turn"] for r in multiturn["rows"]] == [1, 2]
    for row in multiturn["rows"]:
        assert {"cold_ttft_s", "warm_ttft_s", "warm_over_cold", "answers_equal"} <= set(row)
        assert row["answers_equal"] and row["prompt_tokens_equal"]
    assert {"later_turns_max_ratio", "target_met", "answers_equal"} <= set(multiturn["verdict"])
    assert "warm_over_cold" in multiturn["table"]
    grammar = sections["grammar"]
    assert [r["case"] for r in grammar["rows"]] == ["test_schema", "receipt", "json_object"]
    assert all(r["per_token_ms"] > 0 and r["answers_failed"] == 0 for r in grammar["rows"])
    assert "target_met" in grammar["verdict"]
    hostile = sections["hostile"]
    assert hostile["concurrent"] == 2 and len(hostile["heavy_s"]) == 2 and not hostile["heavy_errors"]
    assert hostile["alone_s"] and hostile["loaded_s"] and "met" in hostile["verdict"]
    dtype = sections["dtype"]
    assert [r["rows"] for r in dtype["decode"]] == [1, 8, 16]
    assert all(r["float32_tok_s"] > 0 and r["bfloat16_tok_s"] > 0 for r in dtype["decode"])
    assert [r["image"] for r in dtype["image_ttft"]] == ["640x480", "1920x1080"]
    assert dtype["load"]["bfloat16"]["weights_bytes"] * 2 == dtype["load"]["float32"]["weights_bytes"]
    assert set(dtype["served"]) == {"float32", "bfloat16"} and "met" in dtype["verdict"]


def test_decode_rate_leaves_out_runs_streamed_in_one_chunk(monkeypatch):
    # A few fast tokens can all arrive in one chunk: no decode interval to time, not a crash.
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.serving import decode_rate

    assert decode_rate([(4, 1.0, 1.0)]) is None
    assert decode_rate([(4, 1.0, 1.0), (5, 2.0, 3.0), (3, 1.0, 2.0), (9, 0.0, 1.0)]) == 4.0


def test_inter_token_gaps_spread_a_chunk_over_the_tokens_it_carried(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.concurrency import chunk_tokens, token_gaps

    # 6 tokens in 4 chunks: the extra tokens went with the long gap (held-back bytes, a slow pull).
    assert chunk_tokens([0.0, 0.1, 0.2, 0.6], 6) == [1, 1, 1, 3]
    assert token_gaps([0.0, 0.1, 0.2, 0.6], 6) == pytest.approx([0.1, 0.1, 0.4 / 3, 0.4 / 3, 0.4 / 3])
    assert chunk_tokens([0.0, 0.1, 0.2, 0.6], 4) == [1, 1, 1, 1]
    assert chunk_tokens([2.0], 4) == [4] and token_gaps([2.0], 4) == []


def test_the_gpu_targets_are_judged_only_on_a_gpu_run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.concurrency import verdict

    def row(n, steady, direct):
        return {"concurrency": n, "steady_tok_s": steady, "direct_tok_s": direct, "e2e_over_direct": 1.0,
                "steady_over_direct": steady / direct, "served_e2e_tok_s": steady, "direct_e2e_tok_s": direct}

    rows = [row(1, 50.0, 50.0), row(4, 180.0, 190.0), row(8, 290.0, 320.0)]
    cpu = verdict({"device": "cpu", "workloads": {"chat": {"rows": rows}}})
    assert not any(k.startswith("gpu_") for k in cpu["chat"])
    gpu = verdict({"device": "cuda", "workloads": {"chat": {"rows": rows}}})["chat"]
    assert gpu["gpu_decode_scaling_4_over_1"] == pytest.approx(3.6) and gpu["gpu_scaling_4_over_1_met"]
    assert gpu["gpu_decode_scaling_8_over_1"] == pytest.approx(5.8) and not gpu["gpu_scaling_8_over_1_met"]
    assert gpu["gpu_direct_decode_scaling_8_over_1"] == pytest.approx(6.4)
