"""Continuous batching on the tiny model: parity in mixed batches, per-row sampling, bookkeeping."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from PIL import Image

from conftest import CASES_DIR, FIXTURES
from ovis2_xinf.batching import BatchScheduler, KVBatch, kv_bytes_per_token
from ovis2_xinf.checkpoint import tokens_per_crop
from ovis2_xinf.generation import plan_sampling
from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor
from ovis2_xinf.prompt import Turn, encode

GOLDEN = json.loads((CASES_DIR / "cases.json").read_text())
NAMES = list(GOLDEN["cases"])
GEN = GOLDEN["generation"]
TEXT_IDS = torch.tensor([[526, 384, 198, 462, 527, 198, 526, 439, 198]])


def case_inputs(loaded, name: str, cases=GOLDEN["cases"], cast: bool = True) -> dict:
    """The case's model inputs; ``cast=False`` leaves pixel values in float32 for the scheduler to cast."""
    case = cases[name]
    pre = Ovis2ImagePreprocessor(loaded.checkpoint.preprocessor)
    images = pre.batch([Image.open(CASES_DIR / "images" / f) for f in case["images"]], case["max_partition"])
    encoded = encode(loaded.tokenizer, [Turn(t["from"], t["value"]) for t in case["conversation"]], images,
                     loaded.placeholders, tokens_per_crop(loaded.model.config))
    inputs = {"input_ids": encoded.input_ids, "attention_mask": torch.ones_like(encoded.input_ids)}
    if encoded.pixel_values is not None:
        inputs["pixel_values"] = encoded.pixel_values.to(loaded.dtype) if cast else encoded.pixel_values
    return inputs


def greedy(length: int, max_tokens: int = GEN["max_new_tokens"], **extra):
    return plan_sampling({"temperature": 0, "max_tokens": max_tokens, "repetition_penalty": 1.0, **extra}, {},
                         GEN["eos_token_id"], GEN["pad_token_id"], length, 32768)


def scheduler(loaded, max_num_seqs: int = 8, budget: int = 1 << 30, prefill_slice=None) -> BatchScheduler:
    return BatchScheduler(loaded.model, max_num_seqs, budget, kv_bytes_per_token(loaded.model.config, loaded.dtype),
                          prefill_slice=prefill_slice)


def layer_count(loaded) -> int:
    """Layers where a prefill can pause: the vision encoder's and the language model's."""
    vision = loaded.model.model.vision_tower.transformer.encoder.layers
    return len(vision) + len(loaded.model.model.get_decoder().layers)


def tokens(stream) -> list:
    return [t for batch in stream for t in batch]


@pytest.mark.parametrize("width, prefill_slice", [(4, None), (8, None), (6, 0.0)])
def test_every_golden_case_in_mixed_batches_gives_its_greedy_tokens(tiny_model, width, prefill_slice):
    """``prefill_slice`` 0: every prefill next to decoding rows pauses at each layer for a decode step."""
    sched = scheduler(tiny_model, max_num_seqs=width, prefill_slice=prefill_slice)
    try:
        order = NAMES[::-1] if width == 4 else NAMES  # different neighbours in each run
        streams = [(n, sched.submit(case_inputs(tiny_model, n), greedy(case_inputs(tiny_model, n)["input_ids"].shape[1])))
                   for n in order]
        for name, stream in streams:
            assert tokens(stream) == GOLDEN["cases"][name]["greedy_ids"], name
        # the rows really decoded together; with pausing prefills, short answers end before all have joined
        assert sched.stats.max_batch >= (min(width, 4) if prefill_slice is None else 2)
        assert (sched.stats.steps_in_prefills > 0) == (prefill_slice is not None)
    finally:
        sched.close()


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_cases_in_a_batch_match_their_solo_runs(bits):
    from ovis2_xinf.loader import load_model
    from ovis2_xinf.quantization import gptq_backend_available, quantization_loader_for

    if not gptq_backend_available():
        pytest.skip("GPTQModel not installed")
    path = FIXTURES / f"tiny-ovis2-gptq-int{bits}"
    loaded = load_model(path, quantization_loader=quantization_loader_for("gptq", path, "cpu"))
    names = list(json.loads((FIXTURES / f"tiny-ovis2-gptq-int{bits}-cases" / "cases.json").read_text())["cases"])
    solo_sched = scheduler(loaded, max_num_seqs=1)
    batch_sched = scheduler(loaded, max_num_seqs=8)
    try:
        assert loaded.dtype != torch.float32  # the scheduler casts the pixel values itself
        inputs = {n: case_inputs(loaded, n, cast=False) for n in names}
        solo = {n: tokens(solo_sched.submit(inputs[n], greedy(inputs[n]["input_ids"].shape[1]))) for n in names}
        streams = {n: batch_sched.submit(inputs[n], greedy(inputs[n]["input_ids"].shape[1])) for n in names}
        batched = {n: tokens(s) for n, s in streams.items()}
        # Half-precision kernels: the first tokens must agree; later ones may flip on near-ties.
        assert all(batched[n][:2] == solo[n][:2] for n in names), (batched, solo)
        assert batch_sched.stats.max_batch >= 2
    finally:
        solo_sched.close()
        batch_sched.close()


def test_a_batched_decode_step_gives_each_row_its_solo_logits(tiny_model):
    assert_merged_step_matches_solo(tiny_model)


def assert_merged_step_matches_solo(loaded) -> None:
    """Left padding, masks and positions: a merged step computes what each row computes alone."""
    from transformers import DynamicCache

    model = loaded.model
    rows = [case_inputs(loaded, n) for n in ("text_only", "single_wide", "multi_turn")]
    batch, solo_logits, next_ids, positions = KVBatch(), [], [], []
    with torch.inference_mode():
        for inputs in rows:
            out = model(**inputs, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
            length = inputs["input_ids"].shape[1]
            alone = model(input_ids=torch.tensor([[token]]), attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                          position_ids=torch.tensor([[length]]), past_key_values=_copy(out.past_key_values), use_cache=True)
            solo_logits.append(alone.logits[0, -1])
            batch.add(out.past_key_values)
            next_ids.append([token])
            positions.append([length])
        assert batch.pads[0] > 0 and min(batch.pads) == 0  # rows of different lengths, left-padded
        merged = model(input_ids=torch.tensor(next_ids), attention_mask=batch.attention_mask(torch.device("cpu")),
                       position_ids=torch.tensor(positions), past_key_values=batch.cache, use_cache=True)
    for index, expected in enumerate(solo_logits):
        assert torch.allclose(merged.logits[index, -1], expected, atol=1e-4, rtol=0), index


def _copy(cache):
    from transformers import DynamicCache

    copy = DynamicCache()
    for layer_index, layer in enumerate(cache.layers):
        copy.update(layer.keys.clone(), layer.values.clone(), layer_index)
    return copy


def test_kv_batch_bookkeeping():
    from transformers import DynamicCache

    def cache(length: int, value: float):
        c = DynamicCache()
        c.update(torch.full((1, 2, length, 4), value), torch.full((1, 2, length, 4), -value), 0)
        return c

    batch = KVBatch()
    batch.add(cache(5, 1.0))
    batch.add(cache(3, 2.0))
    batch.add(cache(7, 3.0))
    assert batch.pads == [2, 4, 0] and batch.length == 7
    mask = batch.attention_mask(torch.device("cpu"))
    assert mask.shape == (3, 8) and mask.sum(1).tolist() == [6, 4, 8]
    keys = batch.cache.layers[0].keys
    assert keys[1, :, :4].abs().sum() == 0 and (keys[1, :, 4:] == 2.0).all()
    batch.keep([0, 1])  # the longest row left: its padding-only columns go too
    assert batch.pads == [0, 2] and batch.length == 5
    assert (batch.cache.layers[0].values[0] == -1.0).all()
    batch.keep([1])
    assert batch.pads == [0] and batch.length == 3 and (batch.cache.layers[0].keys == 2.0).all()
    batch.keep([])
    assert batch.size == 0 and batch.cache is None


def test_a_seeded_request_samples_the_same_alone_and_in_any_batch(tiny_model):
    sampled = plan_sampling({"seed": 11, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "max_tokens": 12}, {},
                            [], 525, TEXT_IDS.shape[1], 4096)
    sched = scheduler(tiny_model)
    try:
        alone = tokens(sched.submit({"input_ids": TEXT_IDS}, sampled))
        others = [sched.submit(case_inputs(tiny_model, n), greedy(case_inputs(tiny_model, n)["input_ids"].shape[1], 40))
                  for n in ("single_wide", "video", "system_prompt")]
        next(others[0])  # the batch is running when the seeded request joins
        joined = tokens(sched.submit({"input_ids": TEXT_IDS}, sampled))
        for stream in others:
            tokens(stream)
        assert alone == joined and len(alone) == 12
        unseeded = plan_sampling({"temperature": 0.9, "max_tokens": 12}, {}, [], 525, TEXT_IDS.shape[1], 4096)
        assert len(tokens(sched.submit({"input_ids": TEXT_IDS}, unseeded))) == 12
    finally:
        sched.close()


def test_a_request_joining_a_running_batch_gets_its_solo_answer(tiny_model):
    sched = scheduler(tiny_model)
    try:
        long_one = sched.submit(case_inputs(tiny_model, "single_large"), greedy(10**3, 200, ignore_eos=True))
        next(long_one)
        joiner = case_inputs(tiny_model, "multi_image")
        assert tokens(sched.submit(joiner, greedy(joiner["input_ids"].shape[1]))) == GOLDEN["cases"]["multi_image"]["greedy_ids"]
        long_one.close()
    finally:
        sched.close()


def test_a_request_arriving_mid_step_is_prefilled_before_that_step_ends(tiny_model):
    # The first decode step of the long request is held at layer 0 until the newcomer has arrived;
    # at layer 1 the step stops, the newcomer is prefilled, and the step runs again with both rows.
    sched = scheduler(tiny_model)
    in_step, go = threading.Event(), threading.Event()

    def hold_one_decode_step(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1 and not go.is_set():
            in_step.set()
            go.wait(30)

    hook = tiny_model.model.get_decoder().layers[0].register_forward_pre_hook(hold_one_decode_step, with_kwargs=True)
    try:
        long_inputs = case_inputs(tiny_model, "single_large")
        go.set()
        solo = tokens(sched.submit(long_inputs, greedy(10**3, 40, ignore_eos=True)))
        go.clear()
        long_one = sched.submit(long_inputs, greedy(10**3, 40, ignore_eos=True))
        first = next(long_one)
        assert in_step.wait(30)
        joiner = case_inputs(tiny_model, "multi_image")
        joined = sched.submit(joiner, greedy(joiner["input_ids"].shape[1]))
        go.set()
        assert tokens(joined) == GOLDEN["cases"]["multi_image"]["greedy_ids"]
        assert first + tokens(long_one) == solo  # the stopped step left no trace in its cache
        assert sched.stats.preemptions == 1
    finally:
        go.set()
        hook.remove()
        sched.close()


def test_a_long_prefill_gives_way_to_decode_steps_and_changes_no_answer(tiny_model):
    sched = scheduler(tiny_model, prefill_slice=0.0)
    try:
        long_inputs, joiner = case_inputs(tiny_model, "single_large"), case_inputs(tiny_model, "multi_image")
        solo = tokens(sched.submit(long_inputs, greedy(10**3, 200, ignore_eos=True)))
        assert sched.stats.steps_in_prefills == 0  # alone, nothing waits for its prefill
        long_one = sched.submit(long_inputs, greedy(10**3, 200, ignore_eos=True))
        first = next(long_one)
        assert tokens(sched.submit(joiner, greedy(joiner["input_ids"].shape[1]))) == GOLDEN["cases"]["multi_image"]["greedy_ids"]
        assert first + tokens(long_one) == solo  # the steps run inside the prefill left the row's answer alone
        assert sched.stats.steps_in_prefills == layer_count(tiny_model)  # one step before each layer
    finally:
        sched.close()


def test_a_prefill_whose_consumer_left_stops_at_its_next_layer(tiny_model):
    import asyncio

    sched = scheduler(tiny_model)
    reached, go = threading.Event(), threading.Event()

    def hold(module, args):
        if not go.is_set():
            reached.set()
            go.wait(30)

    hook = tiny_model.model.model.vision_tower.transformer.encoder.layers[0].register_forward_pre_hook(hold)

    async def leave_during_the_vision_pass():
        stream = sched.submit_async(case_inputs(tiny_model, "single_large"), greedy(10**3, 8))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the stream starts waiting for its first token
        assert await asyncio.get_running_loop().run_in_executor(None, reached.wait, 30)
        first.cancel()  # the client goes while its image is in the vision tower
        with pytest.raises(asyncio.CancelledError):
            await first

    try:
        asyncio.run(leave_during_the_vision_pass())
        go.set()
        deadline = time.monotonic() + 30
        while sched.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.stats.abandoned_prefills == 1 and sched.stats.steps == 0
        after = case_inputs(tiny_model, "single_tiny")
        assert tokens(sched.submit(after, greedy(after["input_ids"].shape[1]))) == GOLDEN["cases"]["single_tiny"]["greedy_ids"]
    finally:
        go.set()
        hook.remove()
        sched.close()


def test_closing_a_stream_ends_its_row_only(tiny_model):
    sched = scheduler(tiny_model)
    try:
        endless = sched.submit({"input_ids": TEXT_IDS}, greedy(TEXT_IDS.shape[1], 3000, ignore_eos=True))
        neighbour_inputs = case_inputs(tiny_model, "single_square")
        neighbour = sched.submit(neighbour_inputs, greedy(neighbour_inputs["input_ids"].shape[1], 8))
        first = next(endless)
        endless.close()  # a client went away
        assert tokens(neighbour) == GOLDEN["cases"]["single_square"]["greedy_ids"]
        deadline = time.monotonic() + 10
        while sched.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not sched.busy and first
        assert sched.stats.rows_decoded < 200  # the endless row did not run to 3000 tokens
    finally:
        sched.close()


def test_asynchronous_consumers_on_one_thread_decode_together_and_leave_alone(tiny_model):
    """``submit_async``: many requests wait on one event loop thread; one that stops reading ends its row only."""
    import asyncio

    sched = scheduler(tiny_model)
    names = ["text_only", "single_wide", "multi_turn"]

    async def answer(name: str) -> list:
        inputs = case_inputs(tiny_model, name)
        return [t async for batch in sched.submit_async(inputs, greedy(inputs["input_ids"].shape[1])) for t in batch]

    async def leaves() -> int:
        stream = sched.submit_async({"input_ids": TEXT_IDS}, greedy(TEXT_IDS.shape[1], 3000, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        return sched.stats.rows_decoded

    async def main():
        return await asyncio.gather(leaves(), *(answer(n) for n in names))

    try:
        decoded_when_left, *answers = asyncio.run(main())
        assert answers == [GOLDEN["cases"][n]["greedy_ids"] for n in names]
        assert sched.stats.max_batch >= 2
        assert sched.stats.rows_decoded < decoded_when_left + 3000  # the row that left did not run on
    finally:
        sched.close()


def test_max_num_seqs_one_runs_requests_one_at_a_time_in_arrival_order(tiny_model):
    sched = scheduler(tiny_model, max_num_seqs=1)
    try:
        streams = [sched.submit({"input_ids": TEXT_IDS}, greedy(TEXT_IDS.shape[1], 5, ignore_eos=True)) for _ in range(4)]
        results = [tokens(s) for s in streams]
        assert all(len(r) == 5 for r in results) and results.count(results[0]) == 4
        assert sched.stats.max_batch == 1
    finally:
        sched.close()


def test_the_kv_budget_holds_requests_back_in_arrival_order(tiny_model):
    per_token = kv_bytes_per_token(tiny_model.model.config, tiny_model.dtype)
    length, max_tokens = TEXT_IDS.shape[1], 6
    sched = scheduler(tiny_model, max_num_seqs=8, budget=2 * (length + max_tokens) * per_token)  # room for two rows
    finished: list = []
    try:
        streams = [sched.submit({"input_ids": TEXT_IDS}, greedy(length, max_tokens, ignore_eos=True)) for _ in range(5)]
        threads = [threading.Thread(target=lambda i=i, s=s: (tokens(s), finished.append(i))) for i, s in enumerate(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(finished) == list(range(5))
        assert sched.stats.max_batch == 2 and sched.stats.waits_for_budget > 0
    finally:
        sched.close()


def test_a_failing_prefill_fails_its_request_only(tiny_model):
    sched = scheduler(tiny_model)
    try:
        good_inputs = case_inputs(tiny_model, "single_tiny")
        good = sched.submit(good_inputs, greedy(good_inputs["input_ids"].shape[1]))
        bad = sched.submit({"input_ids": torch.tensor([[10**6]])}, greedy(1))  # an id outside the vocabulary
        with pytest.raises(Exception):
            tokens(bad)
        assert tokens(good) == GOLDEN["cases"]["single_tiny"]["greedy_ids"]
    finally:
        sched.close()


def test_max_num_seqs_must_be_positive(tiny_model):
    with pytest.raises(ValueError, match="max_num_seqs: must be at least 1"):
        scheduler(tiny_model, max_num_seqs=0)
    with pytest.raises(ValueError, match="prefill_slice: must be 0 s or more"):
        scheduler(tiny_model, prefill_slice=-1.0)


def test_prefill_slice_option(monkeypatch):
    from ovis2_xinf.model import DEFAULT_PREFILL_SLICE_S, PREFILL_SLICE_ENV, prefill_slice_option

    monkeypatch.delenv(PREFILL_SLICE_ENV, raising=False)
    assert prefill_slice_option({}) == DEFAULT_PREFILL_SLICE_S
    assert prefill_slice_option({"prefill_slice_ms": "250"}) == 0.25
    assert prefill_slice_option({"prefill_slice_ms": 0}) is None  # off: a prefill never pauses
    monkeypatch.setenv(PREFILL_SLICE_ENV, "40")
    assert prefill_slice_option({}) == 0.04
    assert prefill_slice_option({"prefill_slice_ms": 500}) == 0.5  # the launch option wins
    for bad in ("-5", "soon", "nan", "inf"):
        with pytest.raises(ValueError, match=f"prefill_slice_ms / {PREFILL_SLICE_ENV}: "):
            prefill_slice_option({"prefill_slice_ms": bad})


_TEAM_PROBE = """
import json, os, time, torch
from concurrent.futures import ThreadPoolExecutor
from ovis2_xinf.batching import run_in_own_thread

def threads():
    return len(os.listdir("/proc/self/task"))

def settled(expected):  # a thread that ended in Python still exits in the OS, its team with it
    deadline = time.monotonic() + 3.0
    while threads() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads()

def compute():
    (torch.ones(1 << 22) * 2).sum()

with ThreadPoolExecutor(1) as pool:  # what asyncio.to_thread runs on
    pool.submit(lambda: None).result()
    before = threads()
    pool.submit(run_in_own_thread, compute).result()
    ours = settled(before)
    pool.submit(compute).result()
    plain = settled(before)
print(json.dumps({"before": before, "ours": ours, "plain": plain, "torch_threads": torch.get_num_threads()}))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="counts OS threads in /proc; needs torch to compute on more than one thread")
def test_work_in_a_passing_thread_leaves_no_openmp_team_in_the_calling_pool_thread():
    """Xinference calls ``load`` on a pool thread that stays; the OpenMP workers torch starts for
    a thread that computes stay with it, unless the work ran on a thread of its own. Counted in a
    fresh process, where no other test's threads come and go."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", _TEAM_PROBE], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    counts = json.loads(probe.stdout.strip().splitlines()[-1])
    assert counts["ours"] == counts["before"], counts
    assert counts["plain"] == counts["before"] + counts["torch_threads"] - 1, counts  # the team that stays


def test_work_in_a_passing_thread_raises_its_error():
    from ovis2_xinf.batching import run_in_own_thread

    def fail() -> None:
        raise OSError("model.safetensors: missing")

    with pytest.raises(OSError, match="model.safetensors: missing"):
        run_in_own_thread(fail)


def test_the_scheduler_computes_with_the_cores_other_work_leaves(tiny_model):
    free = {"cores": 1}
    seen = []
    layer = tiny_model.model.model.get_decoder().layers[0]
    hook = layer.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    run = BatchScheduler(tiny_model.model, 4, 1 << 30, kv_bytes_per_token(tiny_model.model.config, tiny_model.dtype),
                         compute_threads=lambda: free["cores"])
    try:
        first = tokens(run.submit({"input_ids": TEXT_IDS, "attention_mask": torch.ones_like(TEXT_IDS)},
                                  greedy(TEXT_IDS.shape[1], max_tokens=4)))
        assert set(seen) == {1}
        seen.clear()
        free["cores"] = 2
        again = tokens(run.submit({"input_ids": TEXT_IDS, "attention_mask": torch.ones_like(TEXT_IDS)},
                                  greedy(TEXT_IDS.shape[1], max_tokens=4)))
        assert set(seen) == {2} and again == first
    finally:
        hook.remove()
        run.close()


class _FailingGrammar:
    """A grammar that compiled but fails at its second token (as llguidance's per-token limits can)."""

    finished = False

    def __init__(self):
        self.accepted = 0

    def mask(self, scores):
        return scores.clone()

    def accept(self, token):
        self.accepted += 1
        if self.accepted == 2:
            raise RuntimeError("too many expressions constructed")


def test_a_row_whose_grammar_fails_mid_answer_ends_alone(tiny_model):
    from ovis2_xinf.batching import RowOptions

    run = scheduler(tiny_model)
    try:
        steady = run.submit(case_inputs(tiny_model, "text_only"), greedy(TEXT_IDS.shape[1], max_tokens=24))
        first = next(steady)
        failing = run.submit({"input_ids": TEXT_IDS, "attention_mask": torch.ones_like(TEXT_IDS)},
                             greedy(TEXT_IDS.shape[1], max_tokens=24), options=RowOptions(grammar=_FailingGrammar()))
        with pytest.raises(RuntimeError, match="too many expressions"):
            tokens(failing)
        rest = first + tokens(steady)
        alone = tokens(run.submit(case_inputs(tiny_model, "text_only"), greedy(TEXT_IDS.shape[1], max_tokens=24)))
        assert rest == alone
    finally:
        run.close()
