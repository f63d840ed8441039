"""Reliability of the serving path on a real xinference-local: load, cancellation, broken checkpoints."""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from openai import APIError, BadRequestError, OpenAI

from conftest import CASES_DIR, TINY, lose_a_shard, remove_weights, set_wrong_model_type
from ovis2_xinf.local_server import local_server

pytestmark = pytest.mark.integration
ROUNDS = 5
CONCURRENT = 32
REPORT = Path(__file__).parents[1] / "benchmarks" / "results" / "reliability.json"
IMAGE = "data:image/png;base64," + base64.b64encode((CASES_DIR / "images" / "square.png").read_bytes()).decode()
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}

VALID = {
    "text": [{"role": "user", "content": "hello, who are you?"}],
    "image": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                           {"type": "text", "text": "Describe the image."}]}],
}
INVALID = {
    "broken base64": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}]}],
                      "Invalid base64"),
    "unknown type": ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}],
                     "unsupported content type"),
    # Refused before Xinference's own check, whose message lists every tool-calling family.
    "tool role": ([{"role": "tool", "content": "x"}], "messages[0].role: 'tool' is not supported by Ovis2"),
    "not an image": ([{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"plain text, not a picture").decode()}}]}],
                     "not a decodable image"),
}


@pytest.fixture(scope="module")
def server():
    with local_server() as running:
        yield running


@pytest.fixture(scope="module")
def uid(server):
    return server.launch("--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "2",
                         "--model-format", "pytorch", "--model-path", str(TINY))


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.endpoint}/v1", api_key="none", max_retries=0, timeout=120)


def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def one_request(client, uid, kind: str, stream: bool):
    if kind in VALID:
        if stream:
            chunks = client.chat.completions.create(model=uid, messages=VALID[kind], max_tokens=24, stream=True, **GREEDY)
            return "ok", "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reply = client.chat.completions.create(model=uid, messages=VALID[kind], max_tokens=24, **GREEDY)
        return "ok", reply.choices[0].message.content
    messages, _ = INVALID[kind]
    try:
        if stream:
            list(client.chat.completions.create(model=uid, messages=messages, max_tokens=8, stream=True))
        else:
            client.chat.completions.create(model=uid, messages=messages, max_tokens=8)
    except BadRequestError as exc:
        return "error", exc.response.json()["detail"]
    except APIError as exc:
        return "error", str(exc.body or exc)
    return "accepted", None


def test_concurrent_mixed_load_keeps_answers_right_and_memory_flat(server, uid, client):
    expected = {kind: one_request(client, uid, kind, False)[1] for kind in VALID}
    kinds = [*VALID, *INVALID]
    plan = [(kinds[i % len(kinds)], bool(i % 2)) for i in range(CONCURRENT)]
    rounds = []
    for _ in range(ROUNDS):
        start = time.monotonic()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            results = list(pool.map(lambda item: one_request(client, uid, *item), plan))
        wall = time.monotonic() - start
        wrong, unclear = [], []
        for (kind, stream), (status, payload) in zip(plan, results):
            if kind in VALID:
                if status != "ok" or payload != expected[kind]:
                    wrong.append((kind, stream, status, payload))
            elif status != "error" or INVALID[kind][1] not in payload:
                unclear.append((kind, stream, status, payload))
        assert not wrong and not unclear, (wrong, unclear)
        assert httpx.get(f"{server.endpoint}/v1/models", timeout=30).status_code == 200
        rounds.append({"requests": len(plan), "valid": sum(k in VALID for k, _ in plan),
                       "invalid": sum(k in INVALID for k, _ in plan), "wall_s": round(wall, 2),
                       "rss_bytes": tree_rss(server.process.pid)})
    growth = rounds[-1]["rss_bytes"] - rounds[0]["rss_bytes"]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({"rounds": rounds, "rss_growth_bytes": growth, "errors": 0, "crashes": 0}, indent=2))
    assert server.process.poll() is None
    assert growth < 64 * 2**20, rounds  # no per-request leak: 3 x 32 requests may not add 64 MiB


def test_disconnecting_stream_stops_generation(server, uid, client):
    with httpx.stream("POST", f"{server.endpoint}/v1/chat/completions", timeout=60, json={
        "model": uid, "messages": VALID["text"], "max_tokens": 3000, "stream": True, "ignore_eos": True,
        "temperature": 0}) as response:
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen += 1
            if seen >= 4:
                break
    pattern = re.compile(r"generation stopped after (\d+) tokens: its consumer stopped reading")
    deadline = time.monotonic() + 60
    found = []
    while time.monotonic() < deadline and not found:
        found = pattern.findall(server.log_path.read_text(errors="replace"))
        time.sleep(0.5)
    assert found, "the model kept generating after the client left"
    assert int(found[-1]) < 3000
    reply = client.chat.completions.create(model=uid, messages=VALID["text"], max_tokens=2)
    assert reply.usage.completion_tokens == 2


@pytest.mark.parametrize("breakage, message", [
    (remove_weights, "no model.safetensors or model.safetensors.index.json"),
    (lose_a_shard, "model-00002-of-00002.safetensors: weight shard listed in model.safetensors.index.json is missing"),
    (set_wrong_model_type, "config.json: model_type is 'llava', expected 'ovis'"),
], ids=["no weights", "missing shard", "wrong config"])
def test_broken_checkpoint_fails_the_launch_naming_the_file(server, tmp_path, breakage, message):
    broken = tmp_path / "broken"
    shutil.copytree(TINY, broken)
    breakage(broken)
    done = server.xinference("launch", "--model-engine", "transformers", "--model-name", "Ovis2",
                             "--size-in-billions", "2", "--model-format", "pytorch", "--model-path", str(broken),
                             "--model-uid", f"broken-{breakage.__name__.replace('_', '-')}")
    answer = done.stdout + done.stderr
    assert done.returncode != 0
    assert message in answer and str(broken) in answer
    assert "site-packages/torch" not in answer  # the file is named, no trace from inside torch
    assert httpx.get(f"{server.endpoint}/v1/models", timeout=30).status_code == 200
