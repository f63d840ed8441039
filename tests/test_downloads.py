"""The message of a failed download: repo, hub, revision, how the hub was chosen, what to do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ovis2_xinf.downloads import download_failure, hub_choice


def spec(hub="modelscope", quantization="Int8", revision=None):
    return SimpleNamespace(model_hub=hub, model_id=f"AIDC-AI/Ovis2-34B-GPTQ-{quantization}", model_revision=revision,
                           model_size_in_billions=34, model_format="gptq", quantization=quantization)


def failure_chain() -> RuntimeError:
    try:
        try:
            raise ConnectionError("Max retries exceeded with url: /api/v1/models/AIDC-AI/Ovis2-34B-GPTQ-Int8")
        except ConnectionError as inner:
            raise RuntimeError("Failed to download model 'Ovis2' (size: 34, format: gptq) after multiple retries") from inner
    except RuntimeError as outer:
        return outer


def test_message_names_repo_hub_revision_cause_and_remedies():
    message = str(download_failure(spec(), "Ovis2", failure_chain(), auto_detected="modelscope", environ={}))
    assert message.startswith("Could not download Ovis2 34B gptq Int8: repo AIDC-AI/Ovis2-34B-GPTQ-Int8 at revision "
                              "master (the default branch) from modelscope (ConnectionError: Max retries exceeded")
    assert "https://huggingface.co was not reachable from this worker, so Xinference fell back to ModelScope" in message
    assert "--download_hub huggingface" in message and "XINFERENCE_MODEL_SRC=huggingface" in message
    assert "--model-path DIR" in message


def test_int4_and_int8_give_different_messages():
    int4 = str(download_failure(spec(quantization="Int4"), "Ovis2", failure_chain(), None, {}))
    int8 = str(download_failure(spec(quantization="Int8"), "Ovis2", failure_chain(), None, {}))
    assert int4.startswith("Could not download Ovis2 34B gptq Int4: repo AIDC-AI/Ovis2-34B-GPTQ-Int4 ")
    assert int8.startswith("Could not download Ovis2 34B gptq Int8: repo AIDC-AI/Ovis2-34B-GPTQ-Int8 ")


def test_pinned_revision_and_huggingface_default():
    assert "at revision abc123 from huggingface" in str(
        download_failure(spec("huggingface", revision="abc123"), "Ovis2", failure_chain(), None, {}))
    assert "at revision main (the default branch) from huggingface" in str(
        download_failure(spec("huggingface"), "Ovis2", failure_chain(), None, {}))


@pytest.mark.parametrize(
    "hub,auto,environ,expected",
    [
        ("modelscope", None, {"XINFERENCE_MODEL_SRC": "modelscope"}, "XINFERENCE_MODEL_SRC=modelscope on this worker"),
        ("huggingface", None, {"XINFERENCE_MODEL_SRC": "modelscope"}, "asked for by the launch (download_hub)"),
        ("huggingface", "huggingface", {"HF_HUB_OFFLINE": "1"}, "offline mode is on (HF_HUB_OFFLINE)"),
        ("huggingface", "huggingface", {"HF_ENDPOINT": "http://127.0.0.1:9"}, "http://127.0.0.1:9 was reachable"),
        ("modelscope", "huggingface", {}, "asked for by the launch (download_hub)"),
    ],
)
def test_hub_choice(hub, auto, environ, expected):
    assert expected in hub_choice(hub, auto, environ)
