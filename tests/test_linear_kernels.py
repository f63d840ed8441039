"""The CPU linear-kernel choice: both ways give the same product, the choice is kept per row count,
and the batched model with every linear turned still gives each golden case its tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovis2_xinf.linear_kernels import _Chooser, choose_linear_kernels


@pytest.mark.parametrize("bias", [True, False])
def test_both_ways_give_the_linear_product(bias):
    torch.manual_seed(0)
    module = torch.nn.Linear(96, 300, bias=bias)
    chooser = _Chooser(module, max_rows=8)
    for rows in (2, 5, 8):
        x = torch.randn(rows, 1, 96)
        for turned in (False, True):
            chooser.transposed[rows] = turned
            out = chooser(x)
            assert out.shape == (rows, 1, 300) and out.is_contiguous()
            torch.testing.assert_close(out, F.linear(x, module.weight, module.bias), rtol=1e-5, atol=1e-5)


def test_the_choice_is_timed_once_per_row_count_and_only_for_decode_sizes():
    module = torch.nn.Linear(64, 128)
    chooser = _Chooser(module, max_rows=4)
    chooser(torch.randn(1, 64))
    chooser(torch.randn(32, 64))  # a prefill's prompt: F.linear, nothing timed
    assert chooser.transposed == {}
    chooser(torch.randn(3, 1, 64))
    assert set(chooser.transposed) == {3}
    chooser.transposed[3] = "kept"  # a second call with 3 rows reads the choice, does not time again
    chooser(torch.randn(3, 1, 64))
    assert chooser.transposed == {3: "kept"}


def test_only_the_language_model_and_its_head_choose():
    from conftest import TINY
    from ovis2_xinf.loader import load_model

    loaded = load_model(TINY)
    choosers = choose_linear_kernels(loaded.model, 8)
    turned = {id(c.module) for c in choosers}
    language = [m for m in loaded.model.get_decoder().modules() if type(m) is torch.nn.Linear]
    assert {id(m) for m in language} | {id(loaded.model.get_output_embeddings())} == turned
    vision = [m for m in loaded.model.model.vision_tower.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and not any(id(m) in turned for m in vision)


@pytest.fixture(scope="module")
def turned_model():
    """The tiny model with every language-model linear taking the transposed product at 2-8 rows."""
    from conftest import TINY
    from ovis2_xinf.loader import load_model

    loaded = load_model(TINY)
    for chooser in choose_linear_kernels(loaded.model, 8):
        chooser.transposed = {rows: True for rows in range(2, 9)}
    return loaded


def test_a_batched_step_with_every_linear_turned_gives_each_row_its_solo_logits(turned_model):
    from test_batching import assert_merged_step_matches_solo

    assert_merged_step_matches_solo(turned_model)


def test_every_golden_case_batched_with_every_linear_turned(turned_model):
    from test_batching import GOLDEN, NAMES, case_inputs, greedy, scheduler, tokens

    loaded = turned_model
    sched = scheduler(loaded, max_num_seqs=8)
    try:
        streams = [(n, sched.submit(case_inputs(loaded, n), greedy(case_inputs(loaded, n)["input_ids"].shape[1])))
                   for n in NAMES]
        for name, stream in streams:
            assert tokens(stream) == GOLDEN["cases"][name]["greedy_ids"], name
        assert sched.stats.max_batch >= 4
    finally:
        sched.close()
