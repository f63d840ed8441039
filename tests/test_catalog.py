"""The spec catalogue: strict validation and resolution of every variant."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ovis2_xinf.catalog import (
    HUBS,
    CatalogError,
    SpecLookupError,
    load_catalog,
    load_catalog_file,
    parse_catalog,
    resolve,
    resolve_all,
)

SPECS = Path(__file__).parents[1] / "src" / "ovis2_xinf" / "specs.json"
EXPECTED = [
    ("pytorch", n, "none", f"AIDC-AI/Ovis2-{n}B") for n in (1, 2, 4, 8, 16, 34)
] + [("gptq", n, "Int4", f"AIDC-AI/Ovis2-{n}B-GPTQ-Int4") for n in (2, 4, 8, 16, 34)] + [
    ("gptq", 34, "Int8", "AIDC-AI/Ovis2-34B-GPTQ-Int8")
]


@pytest.fixture
def raw() -> dict:
    return json.loads(SPECS.read_text())


def test_packaged_file_loads_with_eleven_specs():
    catalog = load_catalog()
    assert len(catalog.specs) == 11
    assert len(catalog.variants()) == 12
    family = catalog.family
    assert family.model_name == "Ovis2"
    assert family.context_length == 32768
    assert family.model_lang == ["en", "zh"]
    assert family.model_ability == ["chat", "vision"]
    assert family.stop == ["<|im_end|>", "<|endoftext|>"]
    assert family.stop_token_ids == [151645, 151643]
    assert family.model_description.startswith("Ovis (Open VISion) is a novel Multimodal")


def test_placeholder_stays_in_the_file(raw):
    gptq_ids = [s["hubs"][h]["model_id"] for s in raw["specs"] if s["model_format"] == "gptq" for h in HUBS]
    assert gptq_ids and all(i.endswith("-GPTQ-{quantization}") for i in gptq_ids)


@pytest.mark.parametrize("hub", HUBS)
@pytest.mark.parametrize("fmt,size,quant,model_id", EXPECTED)
def test_resolve_every_variant_on_every_hub(fmt, size, quant, model_id, hub):
    resolved = resolve(size, fmt, quant, hub)
    assert resolved.model_id == model_id
    assert (resolved.model_format, resolved.model_size_in_billions, resolved.quantization, resolved.hub) == (
        fmt, size, quant, hub)
    assert resolved.model_revision is None


def test_resolve_all_covers_twelve_choices_on_two_hubs():
    assert len(resolve_all()) == 24


def test_quantization_matches_case_insensitively_and_defaults_when_unique():
    assert resolve(34, "gptq", "int8").model_id == "AIDC-AI/Ovis2-34B-GPTQ-Int8"
    assert resolve("8B", "gptq").quantization == "Int4"
    assert resolve(2).model_id == "AIDC-AI/Ovis2-2B"


@pytest.mark.parametrize(
    "args,needle",
    [
        ((3, "pytorch", None, "huggingface"), "valid choices: 1B/pytorch/none"),
        ((2, "awq", None, "huggingface"), "no Ovis2 spec with format 'awq'"),
        ((34, "gptq", None, "huggingface"), "needs a quantization, one of ['Int4', 'Int8']"),
        ((2, "gptq", "Int8", "huggingface"), "valid: ['Int4']"),
        ((2, "pytorch", None, "openmind_hub"), "valid hubs: huggingface, modelscope"),
        (("two", "pytorch", None, "huggingface"), "is not a number of billions"),
    ],
)
def test_resolve_errors_list_valid_choices(args, needle):
    with pytest.raises(SpecLookupError, match=None) as info:
        resolve(*args)
    assert needle in str(info.value)


def _broken(raw, mutate):
    data = copy.deepcopy(raw)
    mutate(data)
    with pytest.raises(CatalogError) as info:
        parse_catalog(data, source="specs.json")
    return str(info.value)


def test_unknown_key_is_named(raw):
    message = _broken(raw, lambda d: d["specs"][3].update(extra=1))
    assert "specs.json: specs[3].extra: Extra inputs are not permitted" in message


def test_unknown_family_key_is_named(raw):
    message = _broken(raw, lambda d: d["family"].update(colour="blue"))
    assert "family.colour" in message


def test_bad_format_is_named(raw):
    message = _broken(raw, lambda d: d["specs"][0].update(model_format="ggufv2"))
    assert "specs[0].model_format" in message and "pytorch" in message


def test_duplicate_spec_is_named(raw):
    message = _broken(raw, lambda d: d["specs"].append(copy.deepcopy(d["specs"][2])))
    assert "specs[11] duplicates specs[2]" in message and "4B" in message


def test_placeholder_without_quantizations(raw):
    def mutate(d):
        d["specs"][0]["hubs"]["huggingface"]["model_id"] = "AIDC-AI/Ovis2-1B-{quantization}"
    message = _broken(raw, mutate)
    assert "specs[0]" in message and "has {quantization} but the spec has no quantizations" in message


def test_two_quantizations_need_the_placeholder(raw):
    def mutate(d):
        d["specs"][10]["hubs"]["modelscope"]["model_id"] = "AIDC-AI/Ovis2-34B-GPTQ"
    message = _broken(raw, mutate)
    assert "specs[10]" in message and "hubs.modelscope.model_id" in message and "lacks {quantization}" in message


def test_missing_hub_and_wrong_types(raw):
    assert "both hubs" in _broken(raw, lambda d: d["specs"][1]["hubs"].pop("modelscope"))
    assert "specs[1].model_size_in_billions" in _broken(raw, lambda d: d["specs"][1].update(model_size_in_billions="2"))
    assert "family.context_length" in _broken(raw, lambda d: d["family"].update(context_length=0))


def test_pytorch_needs_none_and_gptq_needs_names(raw):
    assert "pytorch specs take quantizations ['none']" in _broken(
        raw, lambda d: d["specs"][0].update(quantizations=["Int4"]))
    assert "real quantization names" in _broken(raw, lambda d: d["specs"][6].update(quantizations=["none"]))


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "specs.json"
    bad.write_text("{not json")
    with pytest.raises(CatalogError, match="not valid JSON"):
        load_catalog_file(bad)
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog_file(tmp_path / "absent.json")


# --- metadata carried over from Xinference's built-in catalogue ---------------------------

def _builtin_ovis2() -> dict:
    """The installed Xinference's own Ovis2 catalogue entry, read from its package data."""
    from importlib import resources

    text = resources.files("xinference.model.llm").joinpath("models", "Ovis2.json").read_text(encoding="utf-8")
    (family,) = json.loads(text)
    return family


def test_family_keeps_the_builtin_model_type_virtualenv_and_chat_template():
    builtin, family = _builtin_ovis2(), load_catalog().family
    assert family.model_type == builtin["model_type"] == "ovis"
    assert family.virtualenv.model_dump() == builtin["virtualenv"]
    assert family.chat_template == builtin["chat_template"]
    for key in ("model_name", "context_length", "model_lang", "model_ability", "model_description",
                "architectures", "stop", "stop_token_ids"):
        assert getattr(family, key) == builtin[key], key


def test_metadata_agrees_with_the_builtin_catalogue():
    catalog = load_catalog()
    builtin = {(s["model_format"], s["model_size_in_billions"]): s["model_src"] for s in _builtin_ovis2()["model_specs"]}
    assert sorted(builtin) == sorted(spec.key for spec in catalog.specs)
    for spec in catalog.specs:
        source = builtin[spec.key]
        for hub in HUBS:
            assert source[hub]["model_id"] == spec.hubs[hub].model_id
            assert source[hub]["quantizations"] == spec.quantizations
        hf = source["huggingface"]
        for quantization in spec.quantizations:
            expected = hf["model_metadata_by_quantization"][quantization] if "model_metadata_by_quantization" in hf \
                else hf["model_metadata"]
            assert spec.metadata_for(quantization).model_dump() == expected, (spec.key, quantization)


def test_every_spec_of_the_xinference_family_carries_metadata_on_both_hubs():
    from ovis2_xinf.xinference_family import build_family

    family = build_family()
    assert family.model_type == "ovis" and family.virtualenv is not None and family.chat_template
    by_choice = {}
    for spec in family.model_specs:
        assert spec.model_metadata is not None, (spec.model_hub, spec.model_id)
        by_choice.setdefault((spec.model_format, spec.model_size_in_billions, spec.quantization), []).append(spec)
    assert len(by_choice) == 12
    int4, int8 = by_choice[("gptq", 34, "Int4")][0], by_choice[("gptq", 34, "Int8")][0]
    assert int4.model_metadata.config_source.startswith("https://huggingface.co/AIDC-AI/Ovis2-34B-GPTQ-Int4/")
    assert int8.model_metadata.config_sha256 != int4.model_metadata.config_sha256


def _metadata(d: dict, index: int) -> dict:
    return d["specs"][index].get("model_metadata") or d["specs"][index]["model_metadata_by_quantization"]["Int4"]


def test_bad_metadata_is_named(raw):
    assert "specs[0].model_metadata.config_sha256" in _broken(
        raw, lambda d: d["specs"][0]["model_metadata"].update(config_sha256="abc"))
    assert "specs[1].model_metadata.num_hidden_layers" in _broken(
        raw, lambda d: d["specs"][1]["model_metadata"].update(num_hidden_layers=0))
    assert "do not divide evenly" in _broken(raw, lambda d: d["specs"][2]["model_metadata"].update(num_key_value_heads=3))
    assert "specs[3].model_metadata.config_source" in _broken(
        raw, lambda d: d["specs"][3]["model_metadata"].update(config_source="https://example.com/config.json"))


def test_metadata_of_another_repo_is_refused(raw):
    def swap(d):
        d["specs"][0]["model_metadata"]["config_source"] = d["specs"][1]["model_metadata"]["config_source"]
    message = _broken(raw, swap)
    assert "specs[0]" in message and "is not a config of AIDC-AI/Ovis2-1B" in message


def test_metadata_per_quantization_must_cover_the_quantizations(raw):
    assert "model_metadata_by_quantization has ['Int4'], quantizations are ['Int4', 'Int8']" in _broken(
        raw, lambda d: d["specs"][10]["model_metadata_by_quantization"].pop("Int8"))
    assert "exactly one of model_metadata and model_metadata_by_quantization" in _broken(
        raw, lambda d: d["specs"][10].update(model_metadata=_metadata(d, 10)))
    assert "exactly one of" in _broken(raw, lambda d: d["specs"][4].pop("model_metadata"))


def test_pytorch_and_gptq_of_one_size_share_the_architecture(raw):
    message = _broken(raw, lambda d: d["specs"][7]["architecture"]["vision"].update(num_hidden_layers=23))
    assert "specs[7].architecture differs from the pytorch spec of the same size" in message
