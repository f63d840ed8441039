"""Parity with the original Ovis2 implementation on the golden fixtures (CPU, float32)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import CASES_DIR, TINY, run_golden_case
from ovis2_xinf.checkpoint import tokens_per_crop
from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor
from ovis2_xinf.prompt import IMAGE_MARKER, Turn, encode, original_ids

CASE_NAMES = sorted(json.loads((CASES_DIR / "cases.json").read_text())["cases"])


def _encode_case(model, case):
    pre = Ovis2ImagePreprocessor.from_pretrained(TINY)
    images = [pre(Image.open(CASES_DIR / "images" / f), case["max_partition"]) for f in case["images"]]
    turns = [Turn(t["from"], t["value"]) for t in case["conversation"]]
    return encode(model.tokenizer, turns, images, model.placeholders, tokens_per_crop(model.model.config))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_prompt_and_ids_equal(tiny_model, cases, name):
    case = cases["cases"][name]
    encoded = _encode_case(tiny_model, case)
    assert encoded.prompt == case["prompt"]
    assert original_ids(encoded.symbolic_ids) == case["input_ids"]


@pytest.mark.parametrize("name", [n for n in CASE_NAMES if n != "text_only"])
def test_pixel_values_equal(tiny_model, cases, reference_tensors, name):
    encoded = _encode_case(tiny_model, cases["cases"][name])
    reference = reference_tensors[f"{name}.pixel_values"]
    assert encoded.pixel_values.shape == reference.shape
    torch.testing.assert_close(encoded.pixel_values, reference, atol=1e-6, rtol=0)


def test_pixel_values_of_a_batch_are_not_copied_again(tiny_model):
    # A photo's crops at max_partition 9 are 21 MiB: the images of a request go to the model
    # in the one tensor they were preprocessed into.
    pre = Ovis2ImagePreprocessor.from_pretrained(TINY)
    opened = [Image.open(CASES_DIR / "images" / name) for name in ("square.png", "tall.png", "wide.png")]
    batch = pre.batch(opened, 9)
    alone = [pre(image, 9) for image in opened]
    for batched, single in zip(batch, alone):
        assert batched.grid == single.grid and batched.layout == single.layout
        torch.testing.assert_close(batched.pixel_values, single.pixel_values, atol=0, rtol=0)
    placeholders, per_crop = tiny_model.placeholders, tokens_per_crop(tiny_model.model.config)
    turns = [Turn("human", IMAGE_MARKER * 3 + "hi")]
    together = encode(tiny_model.tokenizer, turns, batch, placeholders, per_crop)
    assert together.pixel_values.data_ptr() == batch[0].pixel_values.data_ptr()
    assert together.pixel_values.shape[0] == sum(im.pixel_values.shape[0] for im in batch)
    one = encode(tiny_model.tokenizer, [Turn("human", IMAGE_MARKER + "hi")], alone[:1], placeholders, per_crop)
    assert one.pixel_values.data_ptr() == alone[0].pixel_values.data_ptr()
    # Images preprocessed apart, or a batch's images out of order, are stacked by copying.
    for images in (alone, [batch[1], batch[0], batch[2]], batch[:2]):
        turns = [Turn("human", IMAGE_MARKER * len(images) + "hi")]
        stacked = encode(tiny_model.tokenizer, turns, images, placeholders, per_crop).pixel_values
        torch.testing.assert_close(stacked, torch.cat([im.pixel_values for im in images]), atol=0, rtol=0)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_last_logits_and_greedy_tokens(tiny_model, reference_tensors, name):
    logits, tokens, case = run_golden_case(tiny_model, name)
    torch.testing.assert_close(logits, reference_tensors[f"{name}.last_logits"], atol=1e-4, rtol=1e-4)
    assert tokens == case["greedy_ids"]


def test_left_padded_batch(tiny_model, cases, reference_tensors):
    batch = cases["batch"]
    encoded = [_encode_case(tiny_model, cases["cases"][n]) for n in batch["cases"]]
    width = max(e.input_ids.shape[1] for e in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for row, e in enumerate(encoded):
        length = e.input_ids.shape[1]
        ids[row, width - length:] = e.input_ids[0]
        mask[row, width - length:] = 1
    pixels = torch.cat([e.pixel_values for e in encoded if e.pixel_values is not None])
    gen = cases["generation"]
    with torch.no_grad():
        logits = tiny_model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
        out = tiny_model.model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=gen["max_new_tokens"],
            do_sample=False, eos_token_id=gen["eos_token_id"], pad_token_id=gen["pad_token_id"],
        )
    torch.testing.assert_close(logits, reference_tensors["batch.last_logits"], atol=1e-4, rtol=1e-4)
    assert out[:, width:].tolist() == batch["greedy_ids"]


def test_vision_norm_is_skipped(tiny_model):
    """The original never applies AIMv2's final norm; keeping it moves image logits by ~0.04."""
    assert isinstance(tiny_model.model.model.vision_tower.transformer.rms_norm, torch.nn.Identity)
