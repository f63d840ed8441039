"""Memory estimates and engine choices: ours answer as Xinference's built-in Ovis2 does.

The catalogue carries the built-in's per-spec metadata, so the web UI's recommended
configuration, ``xinference cal-model-mem`` and the engine list see the same facts.
Each side runs in its own real ``xinference-local`` (the built-in with the plugin off).
"""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from ovis2_xinf.local_server import console_script, local_server

pytestmark = pytest.mark.integration

REQUESTS = [
    {"model_name": "Ovis2"},
    {"model_name": "Ovis2", "constraints": {"model_size_in_billions": 34, "context_length": 8192}},
    {"model_name": "Ovis2", "constraints": {"model_size_in_billions": 2, "concurrency": 4, "vision_tokens": 2304}},
]


def _without_worker(reply: dict) -> dict:
    reply = dict(reply)
    if isinstance(reply.get("config"), dict):
        reply["config"] = {k: v for k, v in reply["config"].items() if k != "worker_ip"}
    reply["reasons"] = [r for r in reply.get("reasons", []) if r.get("code") != "worker_platform"]
    return reply


def _answers(disable: str) -> dict:
    with local_server(extra_env={"OVIS2_XINF_DISABLE": disable}) as server:
        recommend = [
            _without_worker(httpx.post(f"{server.endpoint}/v1/models/recommend", json=body, timeout=300).json())
            for body in REQUESTS
        ]
        engines = httpx.get(f"{server.endpoint}/v1/engines/Ovis2", timeout=300).json()
    return {"recommend": recommend, "engines": engines}


@pytest.fixture(scope="module")
def both() -> dict:
    return {"ours": _answers("0"), "builtin": _answers("1")}


def test_recommended_configuration_is_the_builtins(both):
    for ours, builtin, body in zip(both["ours"]["recommend"], both["builtin"]["recommend"], REQUESTS):
        assert ours == builtin, body
        assert ours["status"] == "recommended"


def test_engines_and_their_reasons_are_the_builtins(both):
    ours, builtin = both["ours"]["engines"], both["builtin"]["engines"]
    assert sorted(ours) == sorted(builtin)
    for engine in builtin:
        if engine == "Transformers":  # ours lists our class; the choices are the same
            key = lambda p: (p["model_format"], p["model_size_in_billions"], tuple(p["quantizations"]))  # noqa: E731
            assert sorted(map(key, ours[engine])) == sorted(map(key, builtin[engine]))
        else:
            assert ours[engine] == builtin[engine], engine


@pytest.mark.parametrize("args", [("-s", "8", "-f", "pytorch"), ("-s", "34", "-f", "gptq", "-q", "Int8"),
                                  ("-s", "2", "-f", "gptq", "-q", "Int4")])
def test_cal_model_mem_is_the_builtins(args, tmp_path):
    outputs = []
    for disable in ("0", "1"):
        env = {**os.environ, "OVIS2_XINF_DISABLE": disable, "XINFERENCE_HOME": str(tmp_path / disable),
               "XINFERENCE_MODEL_SRC": "huggingface", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([console_script("xinference"), "cal-model-mem", "-n", "Ovis2", *args, "-c", "8192"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=300)
        outputs.append((done.returncode, done.stdout))
    assert outputs[0] == outputs[1]
