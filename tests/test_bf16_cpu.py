"""bfloat16 on the CPU, what :mod:`ovis2_xinf.cpu_dtype` picks where the CPU has native bf16. It
runs on any CPU (without native bf16 only slower), so these run everywhere.

Every golden case, alone (``generate``) and in mixed batches (the scheduler), against the
original's float32 references with the bf16 tolerance of tests/test_cuda.py: last logits within
atol 0.1, rtol 0.05, and its near-tie rule for greedy tokens, applied at every step: the tokens
equal the original's until a step where they differ, and there the original's token must be
within ``NEAR_TIE`` of this run's pick in this run's own scores; after a near tie the answers may
part. GPTQ checkpoints are not moved to bf16: they keep their kernels' compute dtype.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import pytest
import torch

from conftest import FIXTURES, TINY, run_golden_case
from ovis2_xinf import linear_kernels
from ovis2_xinf.batching import RowOptions, TokenLogprob
from ovis2_xinf.cpu_dtype import ENV, choose_cpu_dtype
from ovis2_xinf.linear_kernels import choose_linear_kernels
from ovis2_xinf.loader import load_model
from test_batching import GEN, GOLDEN, NAMES, case_inputs, greedy, scheduler, tokens

ATOL, RTOL = 0.1, 0.05
NEAR_TIE = 0.1
TOP = 5  # logprobs recorded per batched step: a near-tied token is among them


@pytest.fixture(scope="module")
def bf16_model():
    return load_model(TINY, torch.bfloat16)


@pytest.fixture(scope="module")
def turned_bf16_model():
    """As served on the CPU, each language-model linear choosing its kernel per row count: here
    every one forced to the transposed product, the one that differs from ``F.linear``."""
    loaded = load_model(TINY, torch.bfloat16)
    for chooser in choose_linear_kernels(loaded.model, len(NAMES)):
        chooser.transposed = {rows: True for rows in range(2, len(NAMES) + 1)}
    return loaded


def steps_agreed(answer: List[int], scores: Callable[[int], Dict[int, float]], reference: List[int]) -> int:
    """How many leading tokens of ``answer`` are the reference's; asserts that the first one that is
    not was a near tie (``scores(step)``: this run's scores of the tokens at that step)."""
    for step, (ours, theirs) in enumerate(zip(answer, reference)):
        if ours != theirs:
            at = scores(step)
            assert at.get(theirs, -float("inf")) >= at[ours] - NEAR_TIE, (
                f"step {step}: picked {ours} ({at[ours]:.3f}), the original {theirs} ({at.get(theirs)}), no near tie")
            return step
    assert len(answer) == len(reference), (answer, reference)
    return len(answer)


def recorded(logprobs: List[TokenLogprob]) -> Callable[[int], Dict[int, float]]:
    """A batched row's scores per step: the logprobs it recorded (they differ from logits by one
    number per step, so their gaps are the logits' gaps)."""
    return lambda step: {**dict(logprobs[step].top), logprobs[step].token: logprobs[step].logprob}


@pytest.mark.parametrize("name", NAMES)
def test_every_golden_case_alone_follows_the_original(bf16_model, reference_tensors, name, record_property):
    logits, _, case = run_golden_case(bf16_model, name)
    torch.testing.assert_close(logits, reference_tensors[f"{name}.last_logits"], atol=ATOL, rtol=RTOL)
    assert logits[case["greedy_ids"][0]] >= logits.max() - NEAR_TIE
    inputs = case_inputs(bf16_model, name)
    with torch.no_grad():
        out = bf16_model.model.generate(**inputs, max_new_tokens=GEN["max_new_tokens"], do_sample=False,
                                        eos_token_id=GEN["eos_token_id"], pad_token_id=GEN["pad_token_id"],
                                        output_logits=True, return_dict_in_generate=True)
    answer = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    agreed = steps_agreed(answer, lambda step: dict(enumerate(out.logits[step][0].float().tolist())),
                          case["greedy_ids"])
    record_property("tokens_equal", agreed)


@pytest.mark.parametrize("width, turned", [(4, False), (12, False), (12, True)])
def test_every_golden_case_in_mixed_batches_follows_the_original(request, monkeypatch, width, turned,
                                                                  record_property):
    loaded = request.getfixturevalue("turned_bf16_model" if turned else "bf16_model")
    transposed = []
    original = linear_kernels.transposed_linear

    def counted(*args):
        transposed.append(args)
        return original(*args)

    monkeypatch.setattr(linear_kernels, "transposed_linear", counted)
    sched = scheduler(loaded, max_num_seqs=width)
    try:
        rows = []
        for name in NAMES:
            inputs = case_inputs(loaded, name, cast=False)  # float32 pixels: the scheduler casts them
            options = RowOptions(top_logprobs=TOP)
            rows.append((name, options, sched.submit(inputs, greedy(inputs["input_ids"].shape[1]), options=options)))
        agreed = {name: steps_agreed(tokens(stream), recorded(options.logprobs), GOLDEN["cases"][name]["greedy_ids"])
                  for name, options, stream in rows}
        assert sched.stats.max_batch >= 4
        assert bool(transposed) == turned
        record_property("tokens_equal", agreed)
    finally:
        sched.close()


def test_a_left_padded_batch_follows_the_original(bf16_model, reference_tensors):
    batch = GOLDEN["batch"]
    encoded = [case_inputs(bf16_model, name) for name in batch["cases"]]
    width = max(e["input_ids"].shape[1] for e in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - e["input_ids"].shape[1]:] = e["input_ids"][0]
        mask[row, width - e["input_ids"].shape[1]:] = 1
    pixels = torch.cat([e["pixel_values"] for e in encoded if "pixel_values" in e])
    with torch.no_grad():
        logits = bf16_model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1].float()
    torch.testing.assert_close(logits, reference_tensors["batch.last_logits"], atol=ATOL, rtol=RTOL)
    for row, expected in enumerate(batch["greedy_ids"]):
        assert logits[row, expected[0]] >= logits[row].max() - NEAR_TIE


@pytest.mark.parametrize("variant", ["int4", "int8"])
def test_gptq_keeps_its_compute_dtype(monkeypatch, variant):
    """The choice leaves a GPTQ checkpoint at float32 asked, as before: its loader then picks
    (kernels: float16; dequantized: float32), even with bf16 forced for unquantized models."""
    from ovis2_xinf.checkpoint import OriginalCheckpoint
    from ovis2_xinf.gptq import GPTQLoader

    path = FIXTURES / f"tiny-ovis2-gptq-{variant}"
    monkeypatch.setenv(ENV, "bfloat16")
    choice = choose_cpu_dtype(OriginalCheckpoint.open(path), model_format="gptq")
    assert choice.dtype == torch.float32 and choice.source == "quantized"
    for mode, computes in (("kernel", torch.float16), ("dequantize", torch.float32)):
        assert GPTQLoader.for_checkpoint(path, "cpu", mode).compute_dtype(choice.dtype) == computes

