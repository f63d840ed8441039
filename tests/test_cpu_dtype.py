"""The CPU dtype choice: the flag short-cut, the override, the quantized case, the decision on
given timings, the description, and the probe itself on the tiny shapes."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY
from ovis2_xinf import cpu_dtype
from ovis2_xinf.cpu_dtype import ENV, MIN_SPEEDUP, ProbeShapes, choose_cpu_dtype, cpu_bf16_flags, decide

SHAPES = ProbeShapes(64, 128, 2, 32, 64)


def timings(prefill: float, decode: float) -> dict:
    """Fake probe seconds: bf16 ``prefill`` / ``decode`` times faster than float32."""
    return {"prefill_text": (1.0, 1.0 / prefill), "prefill_vision": (2.0, 2.0 / prefill),
            "decode_1": (0.5, 0.5 / decode), "decode_8": (0.8, 0.8 / decode)}


def never(shapes):
    raise AssertionError("the probe must not run")


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr(cpu_dtype, "cpu_bf16_flags", lambda: ("avx512_bf16",))


def test_a_cpu_without_bf16_flags_gets_float32_without_timing(monkeypatch):
    monkeypatch.setattr(cpu_dtype, "cpu_bf16_flags", lambda: ())
    choice = choose_cpu_dtype(SHAPES, timer=never)
    assert (choice.dtype, choice.source, choice.seconds, choice.probe_seconds) == (torch.float32, "flags", {}, 0.0)
    assert choice.speedup is None
    assert choice.describe() == "float32 (auto: no native bf16 on this CPU (no avx512_bf16, amx_bf16, bf16 flag))"


def test_flags_that_cannot_be_read_are_not_a_no(monkeypatch):
    monkeypatch.setattr(cpu_dtype, "cpu_bf16_flags", lambda: None)
    choice = choose_cpu_dtype(SHAPES, timer=lambda shapes: timings(2.0, 2.0))
    assert (choice.dtype, choice.source, choice.flags) == (torch.bfloat16, "timed", None)
    assert "a CPU whose flags cannot be read" in choice.reason


@pytest.mark.parametrize("line, found", [
    ("flags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni", ()),
    ("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni", ("avx512_bf16",)),
    ("flags\t\t: fpu avx512_bf16 amx_bf16 amx_tile amx_int8", ("avx512_bf16", "amx_bf16")),
    ("Features\t: fp asimd sve i8mm bf16 svebf16", ("bf16",)),
    ("Features\t: fp asimd crc32 atomics", ()),
])
def test_the_flags_are_read_from_cpuinfo(tmp_path, line, found):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: SomeVendor\n{line}\n\nprocessor\t: 1\n{line}\n")
    assert cpu_bf16_flags(cpuinfo) == found


def test_no_cpuinfo_means_unknown_flags(tmp_path):
    assert cpu_bf16_flags(tmp_path / "missing") is None
    (tmp_path / "empty").write_text("processor\t: 0\n")
    assert cpu_bf16_flags(tmp_path / "empty") is None


@pytest.mark.parametrize("value, dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32),
                                          (" BFloat16 ", torch.bfloat16)])
def test_the_override_skips_flags_and_probe(monkeypatch, value, dtype):
    monkeypatch.setattr(cpu_dtype, "cpu_bf16_flags", lambda: ())
    monkeypatch.setenv(ENV, value)
    choice = choose_cpu_dtype(SHAPES, timer=never)
    assert (choice.dtype, choice.source) == (dtype, "override")
    assert choice.describe() == f"{str(dtype)[6:]} ({ENV}={str(dtype)[6:]})"


@pytest.mark.parametrize("value", ["auto", ""])
def test_auto_times(monkeypatch, native, value):
    monkeypatch.setenv(ENV, value)
    assert choose_cpu_dtype(SHAPES, timer=lambda shapes: timings(2.0, 2.0)).source == "timed"


def test_a_bad_override_is_refused(monkeypatch):
    monkeypatch.setenv(ENV, "fp16")
    with pytest.raises(ValueError, match=f"{ENV}='fp16': use one of auto, bfloat16, float32"):
        choose_cpu_dtype(SHAPES, timer=never)


def test_a_quantized_checkpoint_keeps_float32_whatever_is_asked(monkeypatch, native):
    monkeypatch.setenv(ENV, "bfloat16")
    choice = choose_cpu_dtype(SHAPES, model_format="gptq", timer=never)
    assert (choice.dtype, choice.source) == (torch.float32, "quantized")


def test_the_probe_gets_the_models_shapes(native, tiny_model):
    seen = []
    choose_cpu_dtype(tiny_model.model.config, timer=lambda shapes: seen.append(shapes) or timings(2.0, 2.0))
    assert seen == [SHAPES]


@pytest.mark.parametrize("prefill, decode, chosen, why", [
    (2.2, 1.6, True, "faster"),
    (1.3, 1.15, True, "faster"),  # geometric mean 1.22
    (1.15, 1.15, False, f"not the {MIN_SPEEDUP:.2f}x faster it must be"),
    (3.0, 0.9, False, "slower at decode"),  # fast overall (1.64x), but every decode step would be slower
    (0.95, 2.5, False, "slower at prefill"),
    (0.5, 0.3, False, f"not the {MIN_SPEEDUP:.2f}x faster it must be"),  # emulated bf16
])
def test_the_decision_on_given_timings(native, prefill, decode, chosen, why):
    assert decide(timings(prefill, decode)) == (chosen, why)
    choice = choose_cpu_dtype(SHAPES, timer=lambda shapes: timings(prefill, decode))
    assert choice.dtype == (torch.bfloat16 if chosen else torch.float32)
    assert choice.prefill_ratio == pytest.approx(prefill) and choice.decode_ratio == pytest.approx(decode)
    assert choice.speedup == pytest.approx((prefill * decode) ** 0.5)


def test_the_decision_needs_both_phases():
    with pytest.raises(ValueError, match="no prefill or no decode"):
        decide({"prefill_text": (1.0, 0.5)})


def test_the_description_and_the_report(native):
    choice = choose_cpu_dtype(SHAPES, timer=lambda shapes: timings(2.25, 1.6))
    text = choice.describe()
    assert text.startswith("bfloat16 (auto on avx512_bf16: bf16 faster: 1.90x float32's speed, prefill 2.25x, "
                           "decode 1.60x; probe ")
    assert text.endswith(" s)")
    report = json.loads(json.dumps(choice.as_dict()))
    assert report["dtype"] == "bfloat16" and report["bf16_flags"] == ["avx512_bf16"]
    assert report["ratios"] == {"prefill_text": 2.25, "prefill_vision": 2.25, "decode_1": 1.6, "decode_8": 1.6}
    assert report["describe"] == text


def test_probe_shapes_from_every_source(tiny_model):
    from ovis2_xinf.checkpoint import OriginalCheckpoint

    assert ProbeShapes.of(tiny_model.model.config) == ProbeShapes.of(OriginalCheckpoint.open(TINY)) == SHAPES
    assert ProbeShapes.of(SHAPES) is SHAPES
    assert ProbeShapes.for_size(1) == ProbeShapes(896, 4864, 24, 1024, 2816)
    with pytest.raises(TypeError):
        ProbeShapes.of({"hidden_size": 64})


def test_the_probe_times_every_product_in_both_dtypes_on_one_thread(monkeypatch):
    threads = torch.get_num_threads()
    seen = []
    original = cpu_dtype._Work.seconds

    def counted(work):
        seen.append(torch.get_num_threads())
        return original(work)

    monkeypatch.setattr(cpu_dtype._Work, "seconds", counted)
    result = cpu_dtype.time_probe(SHAPES, repeats=2)
    assert set(result) == {"prefill_text", "prefill_vision", "decode_1", "decode_8"}
    assert all(fp32 > 0 and bf16 > 0 for fp32, bf16 in result.values())
    assert set(seen) == {cpu_dtype.PROBE_THREADS} and torch.get_num_threads() == threads
    # 2 repeats x 2 dtypes x (1 kernel for prefills and one row, 2 for eight rows)
    assert len(seen) == 2 * 2 * (3 + 2)


def test_the_probe_weights_stay_capped_on_the_largest_model():
    shapes = ProbeShapes.for_size(34)
    up, down = cpu_dtype._mlp(shapes.text_hidden, shapes.text_intermediate, torch.Generator().manual_seed(0))
    assert up.shape[1] == down.shape[0] == shapes.text_hidden  # the real hidden size: the inner one is cut
    assert up.numel() + down.numel() <= cpu_dtype.MAX_LAYER_ELEMENTS < 2 * shapes.text_hidden * shapes.text_intermediate


def test_doctor_reports_the_choice(monkeypatch):
    from ovis2_xinf.cli import cpu_dtype_report

    monkeypatch.setattr(cpu_dtype, "cpu_bf16_flags", lambda: ())
    report = cpu_dtype_report()
    assert report["dtype"] == "float32" and report["bf16_flags"] == [] and report["shapes"] == "Ovis2-1B"
    monkeypatch.setenv(ENV, "half")
    assert "use one of" in cpu_dtype_report()["error"]


def test_auto_ignores_the_override(monkeypatch, native):
    from ovis2_xinf.cpu_dtype import auto_cpu_dtype

    monkeypatch.setenv(ENV, "float32")
    assert auto_cpu_dtype(SHAPES, timer=lambda shapes: timings(2.0, 2.0)).dtype == torch.bfloat16
