"""CUDA checks, for a machine with a GPU (skipped elsewhere): `python -m pytest -q tests/test_cuda.py`.

The same golden references as the CPU parity tests: float32 on CUDA must match them as closely as
on the CPU; bf16 (what the model class picks on CUDA) and the GPTQ kernels must stay within their
precision's tolerance (GPTQ: and pick the first greedy token the original picked).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import CASES_DIR, FIXTURES, TINY, run_golden_case
from ovis2_xinf.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
NAMES = ("text_only", "single_wide", "multi_image", "video")


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 convolutions (cuDNN's default) would blur the float32 comparison."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("name", NAMES)
def test_float32_on_cuda_matches_the_original(name):
    references = load_file(str(CASES_DIR / "tensors.safetensors"))
    loaded = load_model(TINY, torch.float32, "cuda")
    logits, tokens, case = run_golden_case(loaded, name, "cuda")
    torch.testing.assert_close(logits, references[f"{name}.last_logits"], atol=1e-4, rtol=1e-4)
    assert tokens == case["greedy_ids"]


def test_the_model_class_picks_bf16_on_cuda():
    from ovis2_xinf.model import _dtype

    assert _dtype(None, "cuda") == torch.bfloat16


@pytest.mark.parametrize("name", NAMES)
def test_bf16_on_cuda_follows_the_original(name):
    references = load_file(str(CASES_DIR / "tensors.safetensors"))
    loaded = load_model(TINY, torch.bfloat16, "cuda")
    logits, _, case = run_golden_case(loaded, name, "cuda")
    torch.testing.assert_close(logits, references[f"{name}.last_logits"], atol=0.1, rtol=0.05)
    # bf16 may swap near-tied tokens (it does for the video case on CPU): the original's pick
    # must be within bf16 noise of ours.
    assert logits[case["greedy_ids"][0]] >= logits.max() - 0.1


@pytest.mark.parametrize("variant", ["int4", "int8"])
@pytest.mark.parametrize("name", NAMES)
def test_gptq_kernels_on_cuda_follow_the_original(variant, name, record_property):
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    from ovis2_xinf.quantization import quantization_loader_for

    path = FIXTURES / f"tiny-ovis2-gptq-{variant}"
    cases_dir = FIXTURES / f"tiny-ovis2-gptq-{variant}-cases"
    loaded = load_model(path, torch.float16, "cuda", quantization_loader=quantization_loader_for("gptq", path, "cuda"))
    kernels = {type(m).__name__ for m in loaded.model.modules() if isinstance(m, BaseQuantLinear)}
    record_property("gptq_kernels", sorted(kernels))
    assert kernels and all(p.device.type == "cuda" for p in loaded.model.parameters())
    references = load_file(str(cases_dir / "tensors.safetensors"))
    logits, tokens, _ = run_golden_case(loaded, name, "cuda")
    expected = json.loads((cases_dir / "cases.json").read_text())["cases"][name]
    torch.testing.assert_close(logits, references[f"{name}.last_logits"], atol=0.08, rtol=0.02)
    assert tokens[0] == expected["greedy_ids"][0]


@pytest.mark.parametrize("prefill_slice", [None, 0.0])
def test_batched_float32_on_cuda_gives_every_case_its_greedy_tokens(prefill_slice):
    """Continuous batching on the GPU: all golden cases at once, each its reference tokens; with
    ``prefill_slice`` 0, every prefill beside decoding rows pauses at each layer for a decode step."""
    from test_batching import GOLDEN, NAMES as ALL_CASES, case_inputs, greedy, scheduler, tokens

    loaded = load_model(TINY, torch.float32, "cuda")
    sched = scheduler(loaded, max_num_seqs=8, prefill_slice=prefill_slice)
    try:
        streams = {}
        for name in ALL_CASES:
            inputs = {k: v.to("cuda") for k, v in case_inputs(loaded, name).items()}
            streams[name] = sched.submit(inputs, greedy(inputs["input_ids"].shape[1]))
        for name, stream in streams.items():
            assert tokens(stream) == GOLDEN["cases"][name]["greedy_ids"], name
        assert sched.stats.max_batch >= (4 if prefill_slice is None else 2)
        assert (sched.stats.steps_in_prefills > 0) == (prefill_slice is not None)
    finally:
        sched.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for a device map")
def test_batched_decoding_over_a_device_map():
    from test_batching import GOLDEN, case_inputs, greedy, scheduler, tokens

    gib, weights = 1 << 30, (TINY / "model.safetensors").stat().st_size
    loaded = load_model(TINY, torch.float32, "cuda:0", max_memory={0: weights // 2, 1: 8 * gib, "cpu": 8 * gib})
    assert len({p.device for p in loaded.model.parameters()}) > 1
    sched = scheduler(loaded, max_num_seqs=4, prefill_slice=0.0)  # prefills pausing, as on one device
    try:
        names = ("text_only", "single_wide", "multi_image", "video")
        streams = {n: sched.submit({k: v.to("cuda:0") for k, v in case_inputs(loaded, n).items()},
                                   greedy(case_inputs(loaded, n)["input_ids"].shape[1])) for n in names}
        for name, stream in streams.items():
            assert tokens(stream) == GOLDEN["cases"][name]["greedy_ids"], name
    finally:
        sched.close()
