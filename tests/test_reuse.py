"""Reuse across requests: exact, bounded, and keyed on what the model reads."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import CASES_DIR
from ovis2_xinf.batching import BatchScheduler, _Row, kv_bytes_per_token
from ovis2_xinf.checkpoint import tokens_per_crop
from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor
from ovis2_xinf.prompt import Turn, encode
from ovis2_xinf.reuse import ImageRef, ReuseCache, common_prefix, image_key
from test_batching import GOLDEN, NAMES, greedy, tokens


def prompt(loaded, turns, images, max_partition):
    """(inputs, image refs) for a conversation, as the model class builds them."""
    pre = Ovis2ImagePreprocessor(loaded.checkpoint.preprocessor)
    processed = pre.batch([Image.open(CASES_DIR / "images" / f) for f in images], max_partition)
    encoded = encode(loaded.tokenizer, turns, processed, loaded.placeholders, tokens_per_crop(loaded.model.config))
    inputs = {"input_ids": encoded.input_ids, "attention_mask": torch.ones_like(encoded.input_ids)}
    refs, first = [], 0
    if encoded.pixel_values is not None:
        inputs["pixel_values"] = encoded.pixel_values
        for image, (start, end) in zip(processed, encoded.image_spans):
            crops = image.pixel_values.shape[0]
            refs.append(ImageRef(image_key(image.pixel_values), start, end, encoded.pixel_values[first:first + crops]))
            first += crops
    return inputs, refs


def case_prompt(loaded, name):
    case = GOLDEN["cases"][name]
    return prompt(loaded, [Turn(t["from"], t["value"]) for t in case["conversation"]], case["images"],
                  case["max_partition"])


def scheduler(loaded, reuse_bytes: int) -> BatchScheduler:
    return BatchScheduler(loaded.model, 8, 1 << 30, kv_bytes_per_token(loaded.model.config, loaded.dtype),
                          reuse=ReuseCache(reuse_bytes))


def ask(sched, inputs, refs, max_tokens=8):
    return tokens(sched.submit(inputs, greedy(inputs["input_ids"].shape[1], max_tokens), refs))


# --- the prefix rule -----------------------------------------------------------------------

def ref(key, start, end):
    return ImageRef(key, start, end, torch.empty(0))


def test_common_prefix_needs_equal_ids_and_the_same_images_in_place():
    stored_ids, stored_images = [1, 2, 9, 9, 9, 3, 4, 5], [(2, 5, "a")]
    assert common_prefix(stored_ids, stored_images, [1, 2, 9, 9, 9, 3, 4, 5, 6, 7], [ref("a", 2, 5)]) == 8
    assert common_prefix(stored_ids, stored_images, [1, 2, 9, 9, 9, 3, 4, 5, 6], [ref("b", 2, 5)]) == 2  # other image
    assert common_prefix(stored_ids, stored_images, [1, 2, 9, 9, 8], [ref("a", 2, 5)]) == 2  # differs inside it
    assert common_prefix(stored_ids, stored_images, [1, 2, 9, 9, 9, 3, 4, 5], [ref("a", 2, 5)]) == 7  # one to prefill
    assert common_prefix([1, 2, 3], [], [7, 2, 3, 4], []) == 0


def test_the_budget_evicts_least_recently_used_first():
    cache = ReuseCache(budget_bytes=3 * 400)
    for key in "abc":
        cache.put_vision(key, torch.zeros(100))  # 400 bytes each
    assert cache.vision("a") is not None  # a is now the most recent
    cache.put_vision("d", torch.zeros(100))
    assert cache.vision("b") is None and cache.vision("a") is not None and cache.vision("d") is not None
    assert cache.stats.bytes == 1200 and cache.stats.evictions == 1
    cache.put_vision("huge", torch.zeros(1000))  # over the whole budget: not kept, nothing evicted
    assert cache.stats.bytes == 1200 and cache.vision("huge") is None
    assert not ReuseCache(0).enabled


def test_image_key_follows_pixels_and_crops():
    values = torch.rand(5, 3, 8, 8)
    assert image_key(values) == image_key(values.clone())
    changed = values.clone()
    changed[3, 1, 4, 4] += 1e-3
    assert image_key(changed) != image_key(values)
    assert image_key(values[:1]) != image_key(values)


# --- exactness -----------------------------------------------------------------------------

def test_the_reuse_path_gives_the_native_prefill_logits(tiny_model):
    sched = scheduler(tiny_model, 1 << 30)
    try:
        with torch.inference_mode():
            for name in NAMES:
                inputs, refs = case_prompt(tiny_model, name)
                native = tiny_model.model(**inputs, logits_to_keep=1).logits[0, -1]
                for attempt in ("cold", "warm"):  # warm: every token but the last comes from the store
                    row = _Row(inputs, greedy(inputs["input_ids"].shape[1]), torch.device("cpu"), refs)
                    out = sched._prefill_reusing(row)
                    assert torch.allclose(out.logits[0, -1], native, atol=1e-4, rtol=0), (name, attempt)
                    sched._keep_for_reuse(row, out.past_key_values)
        assert sched.reuse.stats.prefix_hits >= len(NAMES) and sched.reuse.stats.vision_hits > 0
    finally:
        sched.close()


def test_every_golden_case_twice_with_reuse_gives_its_greedy_tokens(tiny_model):
    sched = scheduler(tiny_model, 1 << 30)
    try:
        for _ in range(2):
            for name in NAMES:
                inputs, refs = case_prompt(tiny_model, name)
                assert ask(sched, inputs, refs) == GOLDEN["cases"][name]["greedy_ids"], name
        assert sched.reuse.stats.prefix_hits >= len(NAMES)
    finally:
        sched.close()


def test_turn_two_with_the_full_history_equals_its_cold_run(tiny_model):
    first = [Turn("human", "<image>\nWhat is this?")]
    warm = scheduler(tiny_model, 1 << 30)
    cold = scheduler(tiny_model, 0)
    try:
        inputs, refs = prompt(tiny_model, first, ["square.png"], 9)
        answer = tiny_model.tokenizer.decode(ask(warm, inputs, refs, 12), skip_special_tokens=True)
        second = first + [Turn("gpt", answer), Turn("human", "And the colours?")]
        inputs, refs = prompt(tiny_model, second, ["square.png"], 9)
        before = warm.reuse.stats.reused_tokens
        assert ask(warm, inputs, refs, 12) == ask(cold, inputs, refs, 12)
        assert warm.reuse.stats.reused_tokens - before > refs[0].end  # the image and more came from the store
    finally:
        warm.close()
        cold.close()


@pytest.mark.parametrize("change", ["other pixels", "other max_partition"])
def test_a_different_image_at_the_same_place_is_not_reused(tiny_model, change, tmp_path):
    warm = scheduler(tiny_model, 1 << 30)
    cold = scheduler(tiny_model, 0)
    turns = [Turn("human", "<image>\nDescribe it.")]
    try:
        inputs, refs = prompt(tiny_model, turns, ["square.png"], 4)
        ask(warm, inputs, refs)
        image, partition = ("gray.png", 4) if change == "other pixels" else ("square.png", 1)
        if change == "other pixels":  # the same size, so the same ids: only the key tells them apart
            image = str(tmp_path / "gray64.png")
            Image.open(CASES_DIR / "images" / "gray.png").convert("RGB").resize((64, 64)).save(image)
        inputs, refs = prompt(tiny_model, turns, [image], partition)
        assert ask(warm, inputs, refs) == ask(cold, inputs, refs)
    finally:
        warm.close()
        cold.close()


def test_reuse_stays_within_its_budget_under_many_prompts(tiny_model):
    budget = 200_000
    sched = scheduler(tiny_model, budget)
    try:
        for name in NAMES:
            inputs, refs = case_prompt(tiny_model, name)
            assert ask(sched, inputs, refs, 4) == GOLDEN["cases"][name]["greedy_ids"][:4]
            assert sched.reuse.stats.bytes <= budget
        assert sched.reuse.stats.evictions > 0
    finally:
        sched.close()
