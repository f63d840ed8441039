"""GPTQ Int4 / Int8 checkpoints in the original layout: exact dequantized parity and the kernel path."""

from __future__ import annotations

import base64
import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import CASES_DIR, FIXTURES, run_golden_case
from ovis2_xinf.checkpoint import CheckpointError, OriginalCheckpoint
from ovis2_xinf.gptq import GPTQLoader, GPTQSettings, dequantize
from ovis2_xinf.loader import load_model
from ovis2_xinf.quantization import GPTQ_INSTALL_HINT, MissingQuantizationBackend, quantization_loader_for

VARIANTS = ("int4", "int8")
HAVE_GPTQMODEL = importlib.util.find_spec("gptqmodel") is not None
# CI sets this so that a missing backend fails the run instead of skipping the kernel tests.
REQUIRE_GPTQMODEL = os.environ.get("OVIS2_XINF_REQUIRE_GPTQ") == "1"
needs_gptqmodel = pytest.mark.skipif(
    not HAVE_GPTQMODEL and not REQUIRE_GPTQMODEL, reason=f"GPTQModel not installed ({GPTQ_INSTALL_HINT})"
)


def checkpoint_path(variant):
    return FIXTURES / f"tiny-ovis2-gptq-{variant}"


def references(variant):
    cases = json.loads((FIXTURES / f"tiny-ovis2-gptq-{variant}-cases" / "cases.json").read_text())["cases"]
    tensors = load_file(str(FIXTURES / f"tiny-ovis2-gptq-{variant}-cases" / "tensors.safetensors"))
    return cases, tensors


@pytest.fixture(scope="module", params=VARIANTS)
def dequantized(request):
    path = checkpoint_path(request.param)
    return request.param, load_model(path, torch.float32, quantization_loader=GPTQLoader.for_checkpoint(path, "cpu", "dequantize"))


@pytest.mark.parametrize("name", ["text_only", "single_wide", "multi_image", "video"])
def test_exact_dequantized_parity(dequantized, name):
    variant, loaded = dequantized
    cases, tensors = references(variant)
    logits, tokens, _ = run_golden_case(loaded, name)
    torch.testing.assert_close(logits, tensors[f"{name}.last_logits"], atol=1e-4, rtol=1e-4)
    assert tokens == cases[name]["greedy_ids"]


@pytest.fixture(scope="module", params=VARIANTS)
def kernel_loaded(request):
    if not HAVE_GPTQMODEL:
        pytest.fail(f"OVIS2_XINF_REQUIRE_GPTQ=1 but GPTQModel is missing ({GPTQ_INSTALL_HINT})")
    path = checkpoint_path(request.param)
    loader = quantization_loader_for("gptq", path, "cpu")
    return request.param, load_model(path, torch.float32, quantization_loader=loader), loader


@needs_gptqmodel
@pytest.mark.parametrize("name", ["text_only", "single_wide", "multi_image", "video"])
def test_kernel_path_parity_in_half_precision(kernel_loaded, name):
    variant, loaded, loader = kernel_loaded
    assert loaded.dtype == torch.float16
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    quantized = [m for m in loaded.model.modules() if isinstance(m, BaseQuantLinear)]
    assert len(quantized) == 14  # 7 linears x 2 decoder layers, nothing else
    cases, tensors = references(variant)
    logits, tokens, _ = run_golden_case(loaded, name)
    # fp16 activations and GPTQModel's CPU kernels: measured max diffs 0.053 (int4), 0.020 (int8)
    torch.testing.assert_close(logits, tensors[f"{name}.last_logits"], atol=0.08, rtol=0.02)
    assert tokens[0] == cases[name]["greedy_ids"][0]


@pytest.mark.parametrize("bits", [4, 8])
def test_unpacking_matches_the_formula(bits):
    torch.manual_seed(bits)
    per_word, in_features, out_features, group = 32 // bits, 16, 8, 4
    q = torch.randint(0, 2**bits, (in_features, out_features), dtype=torch.int32)
    zeros = torch.randint(0, 2**bits - 1, (in_features // group, out_features), dtype=torch.int32)  # stored minus one
    qweight = torch.zeros(in_features // per_word, out_features, dtype=torch.int32)
    for row in range(in_features):
        qweight[row // per_word] |= q[row] << (bits * (row % per_word))
    qzeros = torch.zeros(in_features // group, out_features // per_word, dtype=torch.int32)
    for col in range(out_features):
        qzeros[:, col // per_word] |= zeros[:, col] << (bits * (col % per_word))
    scales = torch.rand(in_features // group, out_features).half()
    g_idx = torch.arange(in_features, dtype=torch.int32) // group
    settings = GPTQSettings(bits=bits, group_size=group, sym=True, desc_act=False, checkpoint_format="gptq")
    weight = dequantize({"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, settings)
    expected = scales.float()[g_idx.long()] * (q.float() - (zeros.float()[g_idx.long()] + 1))
    torch.testing.assert_close(weight, expected.t())


def test_settings_from_the_fixture_and_bad_blocks(tmp_path):
    settings = GPTQSettings.from_checkpoint(OriginalCheckpoint.open(checkpoint_path("int4")))
    assert (settings.bits, settings.group_size, settings.sym, settings.desc_act, settings.checkpoint_format) == (
        4, 32, True, False, "gptq")
    with pytest.raises(CheckpointError, match="no quantization_config block"):
        GPTQSettings.from_checkpoint(OriginalCheckpoint.open(FIXTURES.parent.parent / "src/ovis2_xinf/assets/tiny-ovis2"))


def test_missing_backend_names_what_to_install(monkeypatch):
    import ovis2_xinf.quantization as quantization

    monkeypatch.setattr(quantization, "gptq_backend_available", lambda: False)
    with pytest.raises(MissingQuantizationBackend) as info:
        quantization.quantization_loader_for("gptq", checkpoint_path("int4"), "cpu")
    assert "pip install 'ovis2-xinf[gptq]'" in str(info.value)
    assert quantization.quantization_loader_for("pytorch", checkpoint_path("int4"), "cpu") is None


@needs_gptqmodel
@pytest.mark.integration
def test_gptq_int4_end_to_end():
    from openai import OpenAI

    from ovis2_xinf.local_server import local_server
    from ovis2_xinf.loader import load_tokenizer

    cases, _ = references("int4")
    tokenizer = load_tokenizer(checkpoint_path("int4"))
    image = "data:image/png;base64," + base64.b64encode((CASES_DIR / "images" / "wide.png").read_bytes()).decode()
    with local_server() as server:
        uid = server.launch(
            "--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "2",
            "--model-format", "gptq", "--quantization", "Int4", "--model-path", str(checkpoint_path("int4")),
        )
        client = OpenAI(base_url=f"{server.endpoint}/v1", api_key="none", max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model=uid, max_tokens=8, temperature=0, extra_body={"repetition_penalty": 1.0},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                   {"type": "text", "text": "Describe the image."}]}])
    first = tokenizer.decode(cases["single_wide"]["greedy_ids"][:1], skip_special_tokens=True)
    assert reply.choices[0].message.content.startswith(first)
    assert reply.usage.completion_tokens == 8
