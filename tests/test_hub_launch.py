"""The seed's launch commands, as typed, downloading from local stand-ins of both hubs.

No ``--model-path``: each of the 12 (size, format, quantization) choices is launched once with
``xinference launch --model-engine transformers --model-name Ovis2 --size-in-billions N
--model-format F --quantization Q``, Xinference's cache manager downloads the repo the
catalogue names (``{quantization}`` resolved, default branch) from the stand-in, our class
loads it and answers a chat. The choices alternate between the hubs, so each hub serves
pytorch and GPTQ repos of several sizes (the ids of every choice on both hubs are checked in
test_catalog without a server). Hugging Face is chosen with ``XINFERENCE_MODEL_SRC``, ModelScope
with ``--download_hub`` (the cache folder does not name the hub, so each hub gets its own
server). Then the failures: a hub that is unreachable or lacks the repo.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Tuple

import httpx
import pytest
from openai import OpenAI

from conftest import CASES_DIR, FIXTURES, TINY
from hubs import HF, MS, fake_commit, hub_standins
from ovis2_xinf.catalog import load_catalog, resolve
from ovis2_xinf.local_server import free_port, local_server
from ovis2_xinf.loader import load_tokenizer

pytestmark = pytest.mark.integration

CHOICES: List[Tuple[int, str, str]] = [(s.model_size_in_billions, s.model_format, q) for s, q in load_catalog().variants()]
BRANCH = {HF: "main", MS: "master"}
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}
PROMPT = [{"role": "user", "content": "hello, who are you?"}]


def checkpoint(model_format: str, quantization: str) -> Path:
    return TINY if model_format == "pytorch" else FIXTURES / f"tiny-ovis2-gptq-{quantization.lower()}"


def served(hub: str) -> dict:
    return {resolve(size, fmt, q, hub).model_id: checkpoint(fmt, q) for size, fmt, q in CHOICES}


def seed_command(size: int, model_format: str, quantization: str) -> List[str]:
    return ["--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", str(size),
            "--model-format", model_format, "--quantization", quantization]


@pytest.fixture(scope="module")
def hubs():
    with hub_standins(served(HF), modelscope_repos=served(MS)) as standins:
        yield standins


LAUNCHES = [(HF if i % 2 == 0 else MS, *choice) for i, choice in enumerate(CHOICES)]


@pytest.fixture(scope="module")
def hub_server(request, hubs):
    hub = request.param
    # Hugging Face through the environment, ModelScope through the launch option.
    env = {**hubs.env, "XINFERENCE_MODEL_SRC": HF} if hub == HF else {**hubs.env, "XINFERENCE_MODEL_SRC": ""}
    with local_server(extra_env=env) as server:
        yield hub, server


@pytest.fixture(scope="module")
def expected_text() -> str:
    case = json.loads((CASES_DIR / "cases.json").read_text())["cases"]["text_only"]
    return load_tokenizer(TINY).decode(case["greedy_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("hub_server,size,model_format,quantization", LAUNCHES, indirect=["hub_server"],
                         ids=[f"{h}-{s}B-{f}-{q}" for h, s, f, q in LAUNCHES])
def test_seed_command_downloads_loads_and_chats(hub_server, hubs, expected_text, size, model_format, quantization):
    hub, server = hub_server
    repo = resolve(size, model_format, quantization, hub).model_id
    before = len(hubs.log.all())
    args = seed_command(size, model_format, quantization) + (["--download_hub", MS] if hub == MS else [])
    uid = server.launch(*args)
    try:
        asked = hubs.log.all()[before:]
        assert {r.repo_id for r in asked if r.repo_id} == {repo}, asked  # the resolved id, nothing else
        assert {r.hub for r in asked if r.repo_id} == {hub}
        assert hubs.log.revisions(hub, repo) <= {BRANCH[hub], fake_commit(repo)}
        assert "model.safetensors" in hubs.log.files(hub, repo) and "config.json" in hubs.log.files(hub, repo)
        cache = server.home / "cache" / "v2" / f"Ovis2-{model_format}-{size}b-{quantization}"
        assert (cache / "config.json").read_bytes() == (checkpoint(model_format, quantization) / "config.json").read_bytes()
        assert re.search(rf"Ovis2 loaded from {re.escape(str(cache))} on cpu", server.log_tail(400)), server.log_tail()
        client = OpenAI(base_url=f"{server.endpoint}/v1", api_key="not-needed", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model=uid, messages=PROMPT, max_tokens=8, **GREEDY)
        assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")
        if model_format == "pytorch":  # the same weights as the golden fixture: its greedy answer
            assert reply.choices[0].message.content == expected_text
        else:
            assert reply.choices[0].message.content
    finally:
        server.xinference("terminate", "--model-uid", uid)


# --- failures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unreachable_hf():
    """Hugging Face unreachable (a closed port), ModelScope up but without the 34B Int4 repo."""
    ms = {k: v for k, v in served(MS).items() if not k.endswith("-Int4")}
    with hub_standins({}, modelscope_repos=ms) as standins:
        env = {**standins.env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "XINFERENCE_MODEL_SRC": "",
               "XINFERENCE_DOWNLOAD_MAX_ATTEMPTS": "1", "XINFERENCE_HUB_DETECT_TIMEOUT": "2"}
        with local_server(extra_env=env) as server:
            yield standins, server, env["HF_ENDPOINT"]


def _launch_error(server, *args: str) -> str:
    done = server.xinference("launch", *args)
    assert done.returncode != 0, done.stdout
    return done.stdout + done.stderr


def test_auto_detected_modelscope_serves_when_huggingface_is_unreachable(unreachable_hf):
    standins, server, _ = unreachable_hf
    uid = server.launch(*seed_command(34, "gptq", "Int8"))
    try:
        assert standins.log.repos(MS) == {"AIDC-AI/Ovis2-34B-GPTQ-Int8"}
        assert "Auto-detected download hub: modelscope" in server.log_tail(400)
    finally:
        server.xinference("terminate", "--model-uid", uid)


def test_missing_repo_names_repo_hub_revision_and_how_the_hub_was_chosen(unreachable_hf):
    _, server, hf_endpoint = unreachable_hf
    output = _launch_error(server, *seed_command(34, "gptq", "Int4"))
    assert ("Could not download Ovis2 34B gptq Int4: repo AIDC-AI/Ovis2-34B-GPTQ-Int4 at revision master "
            "(the default branch) from modelscope") in output, output
    assert f"auto-detected: {hf_endpoint} was not reachable from this worker" in output
    assert "--download_hub huggingface" in output and "--model-path DIR" in output
    assert "Ovis2-34B-GPTQ-Int8" not in output  # the Int8 repo is not the one that failed


def test_unreachable_hub_asked_for_by_the_launch(unreachable_hf):
    _, server, _ = unreachable_hf
    output = _launch_error(server, *seed_command(2, "pytorch", "none"), "--download_hub", HF)
    assert ("Could not download Ovis2 2B pytorch: repo AIDC-AI/Ovis2-2B at revision main (the default branch) "
            "from huggingface") in output, output
    assert "The hub was asked for by the launch (download_hub)" in output


def test_server_keeps_serving_after_failed_downloads(unreachable_hf):
    _, server, _ = unreachable_hf
    _launch_error(server, *seed_command(16, "gptq", "Int4"))
    assert httpx.get(f"{server.endpoint}/v1/models", timeout=30).status_code == 200
    uid = server.launch(*seed_command(1, "pytorch", "none"))
    client = OpenAI(base_url=f"{server.endpoint}/v1", api_key="not-needed", max_retries=0, timeout=300)
    assert client.chat.completions.create(model=uid, messages=PROMPT, max_tokens=2, **GREEDY).choices[0].message
    server.xinference("terminate", "--model-uid", uid)
